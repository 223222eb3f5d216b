"""The certificate directory: every `*.pem` file in it, indexed by the names it covers.

Owns the scan (entries compared by name, inode, mtime and size, so adding, renaming,
replacing and removing files is seen without a reload), the last good bundle of each file
(a file replaced by garbage keeps serving its last good certificate) and the choice among
files covering one name. Blocking file I/O and parsing: every method runs on the certificate
thread (proxy.worker.certs), one call at a time; it never touches the event loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from proxy.core.certcheck import MAX_BUNDLE_BYTES, Bundle, CertError, check, load_bundle

MAX_FILES = 100_000  # entries beyond this are ignored (with an error): a scan stays bounded

StatKey = tuple[int, int, int, int]  # (device, inode, mtime ns, size)


@dataclass(frozen=True, slots=True)
class _Good:
    """A checked bundle kept small: its canonical PEM and what choosing needs. A Bundle
    costs ~7.5 KiB of parsed objects, this ~2 KiB (bench/certs.py); the chosen one is
    parsed and checked again before it is built."""

    pem: bytes
    names: tuple[str, ...]
    not_before: float
    not_after: float
    digest: str

    @classmethod
    def of(cls, b: Bundle) -> _Good:
        return cls(b.pem, b.names, b.not_before, b.not_after, b.digest)


@dataclass(slots=True)
class _File:
    stat: StatKey
    good: _Good | None  # the last content of this file that passed its checks
    pending: _Good | None = None  # the current content, sound but not yet valid


@dataclass(slots=True)
class ScanResult:
    changed: set[str] = field(default_factory=set)  # names whose candidates changed
    rejected: list[tuple[str, CertError]] = field(default_factory=list)  # (path, why)
    errors: list[str] = field(default_factory=list)  # the directory itself (unreadable...)


class DirSource:
    """`*.pem` files of one directory (dot-files skipped: editors' and writers' temporaries)."""

    def __init__(self, certs_dir: str) -> None:
        self.dir = certs_dir
        self.files: dict[str, _File] = {}  # path -> state
        self.index: dict[str, set[str]] = {}  # name (or "*.parent") -> paths
        self.dir_error: str | None = None

    def source(self, path: str) -> str:
        return f"file {path}"

    # -- scanning --
    def _entries(self, result: ScanResult) -> dict[str, StatKey] | None:
        found: dict[str, StatKey] = {}
        try:
            with os.scandir(self.dir) as it:
                for e in it:
                    if not e.name.endswith(".pem") or e.name.startswith("."):
                        continue
                    if len(found) >= MAX_FILES:
                        result.errors.append(f"{self.dir}: more than {MAX_FILES} files")
                        break
                    try:
                        st = e.stat()  # follows symlinks (certbot's live/ links)
                    except OSError:
                        continue  # removed since listed
                    if e.is_file():
                        found[e.path] = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError as e:
            text = f"{self.dir}: {e.strerror or e}"
            if text != self.dir_error:
                result.errors.append(text)
            self.dir_error = text
            return None  # unreadable: keep what we had, as for a garbage file
        self.dir_error = None
        return found

    def scan(self, now: float) -> ScanResult:
        """Pick up added, changed and removed files; returns what changed and what failed."""
        result = ScanResult()
        found = self._entries(result)
        if found is None:
            return result
        for path in [p for p in self.files if p not in found]:
            self._set_good(path, None, result)
            del self.files[path]
        for path, key in found.items():
            f = self.files.get(path)
            if f is None or f.stat != key:
                self._load(path, key, now, result)
            elif f.pending is not None and now >= f.pending.not_before:
                self._promote(path, f, now, result)
        return result

    def _load(self, path: str, key: StatKey, now: float, result: ScanResult) -> None:
        f = self.files.get(path)
        if f is None:
            f = self.files[path] = _File(key, None)
        f.stat = key
        f.pending = None
        try:
            bundle = load_bundle(_read(path))
        except CertError as e:
            result.rejected.append((path, e))
            return  # the last good content (if any) keeps serving
        except OSError as e:  # removed or unreadable between listing and reading
            result.errors.append(f"{path}: {e.strerror or e}")
            return
        try:
            _check_any(bundle, now)
        except CertError as e:
            result.rejected.append((path, e))
            if e.reason == "not_yet_valid":
                f.pending = _Good.of(bundle)  # promoted by a later scan once its time comes
            return
        self._set_good(path, _Good.of(bundle), result)

    def _promote(self, path: str, f: _File, now: float, result: ScanResult) -> None:
        good, f.pending = f.pending, None
        assert good is not None
        try:
            _check_any(load_bundle(good.pem), now)
        except CertError as e:
            result.rejected.append((path, e))
            return
        self._set_good(path, good, result)

    def _set_good(self, path: str, bundle: _Good | None, result: ScanResult) -> None:
        f = self.files.get(path)
        old = f.good if f is not None else None
        if f is not None:
            f.good = bundle
        if old is bundle:
            return
        for name in old.names if old is not None else ():
            paths = self.index.get(name)
            if paths is not None:
                paths.discard(path)
                if not paths:
                    del self.index[name]
            result.changed.add(name)
        for name in bundle.names if bundle is not None else ():
            self.index.setdefault(name, set()).add(path)
            result.changed.add(name)

    # -- choosing --
    def best(self, name: str, now: float) -> tuple[str, Bundle] | None:
        """The file whose last good bundle passes every check for `name` now, the latest
        notAfter first (then the path, for a stable choice); None if no file does."""
        found: list[tuple[float, str, _Good]] = []
        for path in self.index.get(name, ()):
            f = self.files.get(path)
            g = f.good if f is not None else None
            if g is not None and g.not_before <= now <= g.not_after:
                found.append((-g.not_after, path, g))
        for _, path, g in sorted(found):
            try:
                bundle = load_bundle(g.pem)
                check(bundle, name, now)  # every check again, on what will be built
            except CertError:
                continue
            return path, bundle
        return None


def _read(path: str) -> bytes:
    """The file's bytes, at most MAX_BUNDLE_BYTES + 1 (load_bundle refuses more)."""
    with open(path, "rb") as fh:
        return fh.read(MAX_BUNDLE_BYTES + 1)


def _check_any(bundle: Bundle, now: float) -> None:
    """Every check but the name's, for a bundle read from a file: it must cover one name."""
    if not bundle.names:
        raise CertError("name_mismatch", "the leaf covers no DNS name")
    check(bundle, bundle.names[0], now)
