"""TLS session tickets that any worker of any generation can decrypt: ticket keys
derived from one shared secret per epoch, installed into OpenSSL through ctypes.

Owns the key schedule (HKDF-SHA256 of the secret per epoch of `period` seconds: encrypt
with the current epoch's key, accept the previous, current and next, renew a ticket that
was not made with the current one) and the ticket-key callback on a server context. It
must not decide what a failure means for the worker: `install` says False (and
`last_failure()` why), and resumption then stays per process (degraded, never broken).

The secret is what makes workers agree: the master draws one with `new_secret()` per
master life and hands it to every worker it starts (all generations of that master); a
master that replaces another (an upgrade by fd handover) must take the old one's secret
too, or tickets issued before the handover stop resuming.
"""

from __future__ import annotations

import ctypes
import math
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.worker import libssl

SECRET_BYTES = 32
MIN_SECRET_BYTES = 16
NAME_BYTES = libssl.TLSEXT_KEYNAME_LENGTH  # 16
AES_BYTES = 32  # AES-256-CBC, what OpenSSL uses for its own tickets
HMAC_BYTES = 32  # HMAC-SHA256
INFO = b"edgeproxy ticket"
DEFAULT_TICKETS = 2  # TLS 1.3 tickets per full handshake, OpenSSL's default
IV_BATCH = 256  # ticket IVs drawn from RAND_bytes at once

# Return values of the ticket key callback (SSL_CTX_set_tlsext_ticket_key_cb(3)).
_NONE = 0  # decrypt: unknown key, full handshake; encrypt: issue no ticket
_OK = 1
_RENEW = 2  # decrypted, and the client gets a fresh ticket under the current key


def new_secret() -> bytes:
    """32 random bytes: the secret a master draws once and hands to its workers."""
    return os.urandom(SECRET_BYTES)


@dataclass(frozen=True, slots=True)
class EpochKey:
    """One epoch's ticket key: name (sent in the clear in every ticket), AES and HMAC keys."""

    epoch: int
    name: bytes
    aes: bytes
    hmac: bytes


def derive(secret: bytes, epoch: int) -> EpochKey:
    """HKDF-SHA256(secret, info = INFO + epoch as 8 signed big-endian bytes), no salt,
    split into the 16-byte key name, the AES-256 key and the HMAC-SHA256 key."""
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=NAME_BYTES + AES_BYTES + HMAC_BYTES,
        salt=None,
        info=INFO + epoch.to_bytes(8, "big", signed=True),
    ).derive(secret)
    return EpochKey(epoch, okm[:NAME_BYTES], okm[NAME_BYTES:-HMAC_BYTES], okm[-HMAC_BYTES:])


class TicketKeys:
    """The key schedule: epoch e = floor(clock() / period); the keys of e-1, e, e+1 are
    known (e+1 so that a process whose clock is a little ahead is still understood).

    A ticket is accepted from its issue until the end of the next epoch: at least
    `period`, at most 2 x `period` seconds. `install` sets the context's session timeout
    (the lifetime hint clients see) to `period`, so no ticket outlives its key.
    """

    __slots__ = ("_callback", "_current", "_hi", "_keys", "_lo", "clock", "period", "secret")

    def __init__(
        self, secret: bytes, period: float, clock: Callable[[], float] = time.time
    ) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"ticket secret of {len(secret)} bytes: at least {MIN_SECRET_BYTES}")
        if not (math.isfinite(period) and period >= 1):
            raise ValueError(f"ticket key period {period!r}: a finite number of seconds >= 1")
        self.secret = bytes(secret)
        self.period = float(period)
        self.clock = clock
        self._lo = self._hi = 0.0  # the current epoch's span of clock(); empty: not yet
        self._current: EpochKey | None = None
        self._keys: dict[bytes, EpochKey] = {}  # name -> key, for e-1, e, e+1
        self._callback: _Callback | None = None  # set by the first install()

    @property
    def callback_errors(self) -> int:
        """Exceptions the ticket callback caught, each a handshake that went on without a
        new ticket or with a full handshake: a count for /metrics."""
        return self._callback.errors if self._callback is not None else 0

    def _now(self) -> EpochKey:
        """The current key; the window moves when clock() has left the current epoch (one
        clock read and two comparisons otherwise: this runs in every ticket operation)."""
        t = self.clock()
        if self._lo <= t < self._hi and self._current is not None:
            return self._current
        e = math.floor(t / self.period)  # a NaN or infinite clock raises here
        old = {k.epoch: k for k in self._keys.values()}
        window = [old.get(x) or derive(self.secret, x) for x in (e - 1, e, e + 1)]
        self._keys = {k.name: k for k in window}
        self._current = window[1]
        self._lo, self._hi = e * self.period, (e + 1) * self.period
        return window[1]

    def current(self) -> EpochKey:
        """The key new tickets are encrypted with."""
        return self._now()

    def lookup(self, name: bytes) -> tuple[EpochKey, bool] | None:
        """The key named `name` and whether the ticket should be renewed (it was not made
        with the current key), or None for a name outside the window (full handshake)."""
        current = self._now()
        k = self._keys.get(name)
        if k is None:
            return None
        return k, k is not current


class _Material:
    """One key as OpenSSL wants it: C buffers that live as long as this object."""

    __slots__ = ("aes", "hmac", "name", "params")

    def __init__(self, lib: libssl.LibSSL, key: EpochKey, evp: bool) -> None:
        self.name = key.name
        self.aes = ctypes.create_string_buffer(key.aes, AES_BYTES)
        self.hmac = ctypes.create_string_buffer(key.hmac, HMAC_BYTES)
        self.params: ctypes.Array[libssl.OsslParam] | None = None  # None: HMAC_CTX
        if evp:
            f = lib.lib
            self.params = (libssl.OsslParam * 3)(
                f.OSSL_PARAM_construct_octet_string(b"key", self.hmac, HMAC_BYTES),
                f.OSSL_PARAM_construct_utf8_string(b"digest", _SHA256, 0),
                f.OSSL_PARAM_construct_end(),
            )


# The digest name the MAC parameters point at: module-level so it never moves or dies.
_SHA256 = ctypes.create_string_buffer(b"SHA256")


class _Callback:
    """The ticket key callback of one TicketKeys, shared by every context it is installed
    on. OpenSSL calls it with the GIL released; ctypes takes the GIL for the call. It runs
    once per ticket made or read, so it does little: about 10 µs measured (bench/)."""

    __slots__ = (
        "cfunc",
        "cipher",
        "errors",
        "evp",
        "iv_at",
        "iv_pid",
        "ivs",
        "ivs_addr",
        "keys",
        "lib",
        "material",
    )

    def __init__(self, lib: libssl.LibSSL, keys: TicketKeys, evp: bool) -> None:
        f = lib.lib
        self.lib = lib
        self.keys = keys
        self.evp = evp  # OpenSSL 3's callback (EVP_MAC_CTX), or the legacy one (HMAC_CTX)
        self.material: dict[bytes, _Material] = {}
        self.errors = 0  # exceptions caught in the callback (the handshake went on without)
        # AES-256-CBC fetched once (OpenSSL 3); EVP_aes_256_cbc() would fetch per ticket.
        self.cipher: int = (
            f.EVP_CIPHER_fetch(None, b"AES-256-CBC", None) if lib.evp else f.EVP_aes_256_cbc()
        )
        if not self.cipher:
            raise libssl.UnavailableError("AES-256-CBC is not available")
        # IVs from RAND_bytes in batches (one call per IV_BATCH tickets, not one each);
        # drawn again in a forked child so that two processes never share one.
        self.ivs = ctypes.create_string_buffer(IV_BATCH * libssl.EVP_MAX_IV_LENGTH)
        self.ivs_addr = ctypes.addressof(self.ivs)
        self.iv_at = len(self.ivs)
        self.iv_pid = 0
        self.cfunc = libssl.TicketCallback(self._call)

    def _get(self, key: EpochKey) -> _Material:
        m = self.material.get(key.name)
        if m is None:
            if len(self.material) >= 6:  # two windows' worth; older keys are gone
                self.material = {}
            m = self.material[key.name] = _Material(self.lib, key, self.evp)
        return m

    def _iv(self, iv: int) -> bool:
        n = libssl.EVP_MAX_IV_LENGTH
        if self.iv_at + n > len(self.ivs) or self.iv_pid != os.getpid():
            if self.lib.lib.RAND_bytes(self.ivs, len(self.ivs)) != 1:
                return False
            self.iv_at, self.iv_pid = 0, os.getpid()
        ctypes.memmove(iv, self.ivs_addr + self.iv_at, n)  # each used once (public after)
        self.iv_at += n
        return True

    def _call(self, ssl_: int, key_name: int, iv: int, cctx: int, mctx: int, enc: int) -> int:
        # Nothing may escape into OpenSSL: any failure is "no ticket" / "full handshake".
        try:
            if enc:
                return self._encrypt(key_name, iv, cctx, mctx)
            return self._decrypt(ssl_, key_name, iv, cctx, mctx)
        except Exception:
            self.errors += 1
            return _NONE

    def _mac_init(self, m: _Material, mctx: int) -> bool:
        f = self.lib.lib
        if m.params is not None:
            return bool(f.EVP_MAC_CTX_set_params(mctx, m.params) == 1)
        return bool(f.HMAC_Init_ex(mctx, m.hmac, HMAC_BYTES, f.EVP_sha256(), None) == 1)

    def _encrypt(self, key_name: int, iv: int, cctx: int, mctx: int) -> int:
        m = self._get(self.keys.current())
        if not self._iv(iv):
            return _NONE
        ctypes.memmove(key_name, m.name, NAME_BYTES)
        if self.lib.lib.EVP_EncryptInit_ex(cctx, self.cipher, None, m.aes, iv) != 1:
            return _NONE
        return _OK if self._mac_init(m, mctx) else _NONE

    def _decrypt(self, ssl_: int, key_name: int, iv: int, cctx: int, mctx: int) -> int:
        f = self.lib.lib
        found = self.keys.lookup(ctypes.string_at(key_name, NAME_BYTES))
        if found is None:
            return _NONE
        key, renew = found
        m = self._get(key)
        if not self._mac_init(m, mctx):
            return _NONE
        if f.EVP_DecryptInit_ex(cctx, self.cipher, None, m.aes, iv) != 1:
            return _NONE
        # TLS 1.3: a fresh ticket after every resumption, as OpenSSL does with its own
        # keys (clients use a ticket once, RFC 8446 C.4); TLS 1.2: only when the key
        # is not the current one (RFC 5077 3.3), again as OpenSSL does.
        if renew or f.SSL_version(ssl_) >= libssl.TLS1_3_VERSION:
            return _RENEW
        return _OK


# Every callback ever handed to OpenSSL, for the life of the process: a context's
# SSL_CTX can outlive the Python object (a connection switched to another context by
# SNI keeps its first one as session context), and OpenSSL would then call freed code.
# One per TicketKeys (shared by all its contexts), so this grows only with the
# TicketKeys a process makes: one per worker life in the proxy.
_LIVE: list[_Callback] = []
_last_failure = ""


def last_failure() -> str:
    """Why the last `install` returned False (empty if none did)."""
    return _last_failure


def install(ctx: ssl.SSLContext, keys: TicketKeys, *, legacy: bool = False) -> bool:
    """Make `ctx` (a PROTOCOL_TLS_SERVER context) issue and accept tickets under `keys`.

    Also makes sure it issues tickets at all: OP_NO_TICKET cleared (with it, TLS 1.3
    tickets would be stateful, in this process's cache only), `num_tickets` at least 1,
    and the session timeout (the ticket lifetime hint) set to the key period. Python
    gives every context the same session id context ("Python"), which a resumed session
    must match: nothing to do there. Install on every server context, and always on the
    one a connection starts with: OpenSSL uses the first context's callback even after an
    SNI callback switched the connection to another.

    Returns False, changing nothing, when anything does not check out (see `libssl`);
    `last_failure()` says why. `legacy` forces the pre-3.0 callback (for tests).
    """
    global _last_failure  # noqa: PLW0603  (one reason for the caller's one log line)
    try:
        lib = libssl.loaded()
        ptr = libssl.ctx_pointer(lib, ctx)
    except libssl.UnavailableError as e:
        _last_failure = str(e)
        return False
    evp = lib.evp and not legacy
    cb = keys._callback  # this module's own object
    if cb is None or cb.lib is not lib or cb.evp != evp:
        try:
            cb = _Callback(lib, keys, evp)
        except libssl.UnavailableError as e:
            _last_failure = str(e)
            return False
        keys._callback = cb
        _LIVE.append(cb)
    if evp:
        ok = lib.lib.SSL_CTX_set_tlsext_ticket_key_evp_cb(ptr, cb.cfunc) == 1
    else:
        fp = ctypes.cast(cb.cfunc, ctypes.c_void_p)
        ok = lib.lib.SSL_CTX_callback_ctrl(ptr, libssl.SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB, fp) == 1
    if not ok:
        _last_failure = "OpenSSL refused the ticket key callback"
        return False
    ctx.options &= ~ssl.OP_NO_TICKET
    if ctx.num_tickets < 1:
        ctx.num_tickets = DEFAULT_TICKETS
    lib.lib.SSL_CTX_set_timeout(ptr, max(1, int(keys.period)))
    return True
