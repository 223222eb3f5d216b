"""The libssl that Python's `ssl` module runs on, reached through ctypes, and the
`SSL_CTX*` inside an `ssl.SSLContext`, each checked before anything is called on it.

Owns finding the copy of libssl the `_ssl` extension loaded (never loading a second
one), the few function signatures the ticket-key shell needs, and the checks that make a
pointer read out of a Python object safe to pass to OpenSSL. It must not change a
context: it only finds and verifies. Linux only (it reads /proc/self/maps); anywhere
else, or on any doubt, it raises `UnavailableError` and the caller does without.
"""

from __future__ import annotations

import ctypes
import os
import ssl
from dataclasses import dataclass

# OpenSSL constants (ssl.h, tls1.h, evp.h); stable since 1.1.0.
SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB = 72
SSL_CTRL_GET_MIN_PROTO_VERSION = 130
SSL_CTRL_GET_MAX_PROTO_VERSION = 131
TLS1_3_VERSION = 0x0304
TLSEXT_KEYNAME_LENGTH = 16
EVP_MAX_IV_LENGTH = 16

# The callback shapes. OpenSSL 3: int cb(SSL*, unsigned char key_name[16],
# unsigned char *iv, EVP_CIPHER_CTX*, EVP_MAC_CTX*, int enc); the legacy one (1.1.x,
# deprecated in 3) passes an HMAC_CTX* in the fifth place. Pointers go as integers.
TicketCallback = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_int,
)

# The probe that a candidate SSL_CTX* points at readable memory reads this many bytes:
# an SSL_CTX is far bigger (over 1 KiB on 1.1.1 and 3.x), its first fields include the
# method pointer checked next.
_PROBE_BYTES = 256


class UnavailableError(Exception):
    """The ticket-key shell cannot be used here; the message says why (for one log line)."""


class OsslParam(ctypes.Structure):
    """OSSL_PARAM (openssl/core.h, OpenSSL 3): built by OpenSSL's own constructors."""

    _fields_ = (
        ("key", ctypes.c_char_p),
        ("data_type", ctypes.c_uint),
        ("data", ctypes.c_void_p),
        ("data_size", ctypes.c_size_t),
        ("return_size", ctypes.c_size_t),
    )


@dataclass(frozen=True, slots=True)
class LibSSL:
    """The loaded libssl (and, through its dependencies, its libcrypto)."""

    lib: ctypes.CDLL
    path: str
    evp: bool  # SSL_CTX_set_tlsext_ticket_key_evp_cb is there (OpenSSL 3)
    methods: frozenset[int]  # TLS_method, TLS_server_method, TLS_client_method
    server_methods: frozenset[int]  # the two a server context can have


def _fn(lib: ctypes.CDLL, name: str, res: object, *args: object) -> None:
    f = getattr(lib, name)  # AttributeError when the symbol is missing
    f.restype = res
    f.argtypes = args


def _bind(lib: ctypes.CDLL) -> bool:
    """Declare every function used; True when the OpenSSL 3 ticket callback is there."""
    vp, c_int, c_long = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    _fn(lib, "OpenSSL_version", ctypes.c_char_p, c_int)
    for m in ("TLS_method", "TLS_server_method", "TLS_client_method"):
        _fn(lib, m, vp)
    _fn(lib, "SSL_CTX_get_ssl_method", vp, vp)
    _fn(lib, "SSL_CTX_get_options", ctypes.c_uint64, vp)
    _fn(lib, "SSL_CTX_get_verify_mode", c_int, vp)
    _fn(lib, "SSL_CTX_ctrl", c_long, vp, c_int, c_long, vp)
    _fn(lib, "SSL_CTX_callback_ctrl", c_long, vp, c_int, vp)
    _fn(lib, "SSL_CTX_set_timeout", c_long, vp, c_long)
    _fn(lib, "SSL_version", c_int, vp)
    _fn(lib, "RAND_bytes", c_int, vp, c_int)
    _fn(lib, "EVP_aes_256_cbc", vp)
    _fn(lib, "EVP_sha256", vp)
    _fn(lib, "EVP_EncryptInit_ex", c_int, vp, vp, vp, vp, vp)
    _fn(lib, "EVP_DecryptInit_ex", c_int, vp, vp, vp, vp, vp)
    _fn(lib, "HMAC_Init_ex", c_int, vp, vp, c_int, vp, vp)
    try:
        _fn(lib, "SSL_CTX_set_tlsext_ticket_key_evp_cb", c_int, vp, TicketCallback)
        _fn(lib, "EVP_MAC_CTX_set_params", c_int, vp, vp)
        _fn(lib, "EVP_CIPHER_fetch", vp, vp, ctypes.c_char_p, ctypes.c_char_p)
        for kind in ("octet", "utf8"):
            name = f"OSSL_PARAM_construct_{kind}_string"
            _fn(lib, name, OsslParam, ctypes.c_char_p, vp, ctypes.c_size_t)
        _fn(lib, "OSSL_PARAM_construct_end", OsslParam)
    except AttributeError:
        return False
    return True


def _mapped(maps: str, stem: str) -> set[str]:
    """Paths of the mapped files whose name starts with `stem` (`libssl.so`)."""
    out = set()
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and os.path.basename(parts[5]).startswith(stem):
            out.add(parts[5])
    return out


def find(maps: str | None = None) -> LibSSL:
    """The libssl `_ssl` runs on, already loaded, its version the one `ssl` reports."""
    import _ssl  # noqa: F401  (loads libssl if ssl did not already)

    if maps is None:
        try:
            with open("/proc/self/maps") as f:
                maps = f.read()
        except OSError as e:
            raise UnavailableError(f"cannot read /proc/self/maps: {e}") from None
    paths = _mapped(maps, "libssl.so")
    if len(paths) != 1:
        # None: _ssl is linked statically; several: no way to tell which one _ssl uses.
        raise UnavailableError(f"expected one loaded libssl, found {sorted(paths) or 'none'}")
    (path,) = paths
    try:
        # RTLD_NOLOAD: the copy already in the process, or an error; never a second copy.
        lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LOCAL)
    except OSError as e:
        raise UnavailableError(
            f"{path} is mapped but dlopen(RTLD_NOLOAD) refused it: {e}"
        ) from None
    try:
        evp = _bind(lib)
    except AttributeError as e:
        raise UnavailableError(f"{path} lacks a needed function: {e}") from None
    version = lib.OpenSSL_version(0)
    if version is None or version.decode("ascii", "replace") != ssl.OPENSSL_VERSION:
        raise UnavailableError(f"{path} reports {version!r}, ssl reports {ssl.OPENSSL_VERSION!r}")
    tls, server, client = lib.TLS_method(), lib.TLS_server_method(), lib.TLS_client_method()
    if not (tls and server and client):
        raise UnavailableError(f"{path}: a TLS method is NULL")
    return LibSSL(lib, path, evp, frozenset((tls, server, client)), frozenset((tls, server)))


_FOUND: LibSSL | UnavailableError | None = None


def loaded() -> LibSSL:
    """`find()` once per process; the same answer (or the same refusal) after that."""
    global _FOUND  # noqa: PLW0603  (one lookup per process, by design)
    if _FOUND is None:
        try:
            _FOUND = find()
        except UnavailableError as e:
            _FOUND = e
    if isinstance(_FOUND, UnavailableError):
        raise _FOUND
    return _FOUND


def readable(address: int, size: int) -> bool:
    """Whether `size` bytes at `address` can be read, without touching them in this
    process: the kernel copies them into a pipe and says EFAULT when they are not mapped."""
    r, w = os.pipe()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        write = libc.write
        write.restype = ctypes.c_ssize_t
        write.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
        return bool(write(w, address, size) == size)
    finally:
        os.close(r)
        os.close(w)


def ctx_pointer(lib: LibSSL, ctx: ssl.SSLContext, *, offset: int | None = None) -> int:
    """The `SSL_CTX*` of a server `ctx`, once it has passed every check.

    CPython's PySSLContext (Modules/_ssl.c) is PyObject_HEAD followed by `SSL_CTX *ctx`,
    so the pointer sits at `object.__basicsize__` from the object's address. The value
    read there is used only when: the memory it points to is readable; the SSL_CTX's
    method is one of this libssl's TLS server methods (so this very copy of libssl made
    it, and it is a server context); its options equal `ctx.options`; its verify mode,
    minimum and maximum protocol versions equal the context's. (`offset`: read the
    candidate elsewhere in the object, for the tests of these checks.)
    """
    if not isinstance(ctx, ssl.SSLContext):
        raise UnavailableError(f"not an ssl.SSLContext: {type(ctx).__name__}")
    base = ssl.SSLContext.__mro__[1]  # _ssl._SSLContext, the C type
    if offset is None:
        offset = object.__basicsize__
    size = ctypes.sizeof(ctypes.c_void_p)
    if base.__basicsize__ < offset + size:
        raise UnavailableError(f"_SSLContext is {base.__basicsize__} bytes: no room for SSL_CTX*")
    ptr = ctypes.c_void_p.from_address(id(ctx) + offset).value
    if not ptr or ptr % size:
        raise UnavailableError(f"SSL_CTX* candidate {ptr!r} is null or misaligned")
    if not readable(ptr, _PROBE_BYTES):
        raise UnavailableError("SSL_CTX* candidate points at unmapped memory")
    method = lib.lib.SSL_CTX_get_ssl_method(ptr)
    if method not in lib.methods:
        raise UnavailableError("SSL_CTX* candidate has no TLS method of this libssl")
    if method not in lib.server_methods:
        raise UnavailableError("a client context (PROTOCOL_TLS_CLIENT) issues no tickets")
    got = (
        lib.lib.SSL_CTX_get_options(ptr),
        lib.lib.SSL_CTX_get_verify_mode(ptr),
        lib.lib.SSL_CTX_ctrl(ptr, SSL_CTRL_GET_MIN_PROTO_VERSION, 0, None),
        lib.lib.SSL_CTX_ctrl(ptr, SSL_CTRL_GET_MAX_PROTO_VERSION, 0, None),
    )
    want = (
        int(ctx.options),
        _VERIFY_FLAGS[ctx.verify_mode],
        _proto(ctx.minimum_version),
        _proto(ctx.maximum_version),
    )
    if got != want:
        raise UnavailableError(f"SSL_CTX* candidate disagrees with the context: {got} != {want}")
    return ptr


# What SSL_CTX_get_verify_mode returns for each Python verify_mode (Modules/_ssl.c):
# CERT_REQUIRED is SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, not 2.
_VERIFY_FLAGS = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}


def _proto(v: ssl.TLSVersion) -> int:
    """What SSL_CTX_get_{min,max}_proto_version returns for a Python TLSVersion: Python
    shows OpenSSL's 0 ("no bound") as MINIMUM_SUPPORTED / MAXIMUM_SUPPORTED."""
    if v in (ssl.TLSVersion.MINIMUM_SUPPORTED, ssl.TLSVersion.MAXIMUM_SUPPORTED):
        return 0
    return int(v)
