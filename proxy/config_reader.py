"""Typed reading of one TOML table for proxy.config: the key path in every error.

Owns ConfigError, Address and its parsing, the typed getters, and where the control
socket goes by default. Imports nothing of the project (proxy.config builds on it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
# A host name, or a one-label wildcard: `*` only as the whole leftmost label and at least
# two labels after it (`*.example.test`; `*.test` would claim a whole top-level domain).
HOST_RE = re.compile(rf"^(?=.{{1,253}}$)(\*\.(?=[^.]+\.[^.]))?{_LABEL}(\.{_LABEL})*$")


class ConfigError(Exception):
    """A config that cannot be used; the message names file and key."""

    def __init__(self, path: str, key: str, problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        super().__init__(f"{os.path.basename(path) or path}: {key}: {problem}")


class Address(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


class Reader:
    """Typed access to one TOML table, remembering the key path for errors."""

    def __init__(self, path: str, prefix: str, data: Mapping[str, Any]) -> None:
        self.path = path
        self.prefix = prefix
        self.data = data

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.path, self.key(name), problem)

    def check_keys(self, allowed: tuple[str, ...]) -> None:
        for k in self.data:
            if k not in allowed:
                raise self.fail(k, f"unknown key (expected one of: {', '.join(allowed)})")

    def get(self, name: str, kind: type[T], default: T | None = None) -> T:
        if name not in self.data:
            if default is None:
                raise self.fail(name, "required")
            return default
        value = self.data[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(name, f"must be {_KIND_NAMES.get(kind, kind.__name__)}, not {value!r}")
        return value

    def positive(self, name: str, kind: type[T], default: T | None = None) -> T:
        value = self.get(name, kind, default)
        if value <= 0:  # type: ignore[operator]  # T is int or float here
            raise self.fail(name, f"must be > 0, not {value!r}")
        return value

    def text(self, name: str, default: str | None = None) -> str:
        value = self.get(name, str, default)
        if not value:
            raise self.fail(name, "must not be empty")
        return value

    def name(self, name: str, default: str | None = None) -> str:
        value = self.text(name, default)
        if not NAME_RE.match(value):
            raise self.fail(name, f"{value!r} is not a valid name (letters, digits, _ . -)")
        return value

    def address(self, name: str, default: str | None = None) -> Address:
        raw = self.text(name, default)
        try:
            return parse_address(raw)
        except ValueError as e:
            raise self.fail(name, str(e)) from None

    def addresses(self, name: str, default: list[str] | None = None) -> tuple[Address, ...]:
        raw = self.get(name, list, default)
        out = []
        for i, item in enumerate(raw):
            if not isinstance(item, str):
                raise self.fail(f"{name}[{i}]", f"must be a string, not {item!r}")
            try:
                out.append(parse_address(item))
            except ValueError as e:
                raise self.fail(f"{name}[{i}]", str(e)) from None
        return tuple(out)

    def table(self, name: str) -> Reader:
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            raise self.fail(name, "must be a table")
        return Reader(self.path, self.key(name), value)

    def tables(self, name: str) -> list[Reader]:
        value = self.data.get(name, [])
        if not isinstance(value, list):
            raise self.fail(name, "must be an array of tables ([[" + name + "]])")
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise ConfigError(self.path, f"{self.key(name)}[{i}]", "must be a table")
            out.append(Reader(self.path, f"{self.key(name)}[{i}]", item))
        return out


_KIND_NAMES: dict[type, str] = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    list: "an array",
}


def parse_address(raw: str) -> Address:
    """`host:port` or `[v6]:port` -> Address; ValueError says what is wrong."""
    if raw.startswith("["):
        host, sep, port = raw[1:].partition("]:")
    else:
        host, sep, port = raw.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{raw!r} is not host:port")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{raw!r}: port must be 0..65535")
    return Address(host, int(port))


def default_control_dir() -> str:
    """The private directory of the control socket when `[listen] control` is not set.

    systemd's $RUNTIME_DIRECTORY, else /run/edgeproxy for root, else the user's
    $XDG_RUNTIME_DIR/edgeproxy or /tmp/edgeproxy-<uid>: never a directory other local
    users can write, where one could plant a socket of their own. Computed only; the
    master creates (0700) and checks it before it binds.
    """
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:
        return runtime.split(":")[0]
    euid = os.geteuid()
    if euid == 0:
        return "/run/edgeproxy"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "edgeproxy")
    return f"/tmp/edgeproxy-{euid}"


def default_control(node_id: str) -> str:
    return os.path.join(default_control_dir(), f"edgeproxy-{node_id}.sock")
