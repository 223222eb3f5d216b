"""Session tickets shared across processes: the key schedule, the checks before anything is
installed, and real handshakes over loopback between separate server processes
(tests/support/ticket_server.py), each with its own SSLContext and the same secret."""

from __future__ import annotations

import base64
import ctypes
import hashlib
import hmac
import os
import re
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from certgen import CA
from ci_policy import needs
from hypothesis import given
from hypothesis import strategies as st
from ticket_server import HOST, IO_TIMEOUT, TicketServer, client_context, talk

from proxy.worker import libssl, tickets

VERSIONS = ("1.2", "1.3")
PERIOD = 100.0  # seconds per key epoch for the servers whose clock a test sets


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the server's bundle: chain then key, the CA certificate) for a.test."""
    d = tmp_path_factory.mktemp("tickets")
    ca = CA.new()
    bundle = ca.issue(("a.test",)).write(d / "a.test.pem")
    (d / "ca.pem").write_bytes(ca.pem())
    return bundle, d / "ca.pem"


def _pid(reply: str) -> str:
    m = re.match(r"pid=(\d+) reused=[01] version=TLSv1\.[23]$", reply)
    assert m, f"not a server reply: {reply!r}"
    return m.group(1)


# -- the key schedule (no sockets) ------------------------------------------------


def _hkdf_sha256(secret: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 with an empty salt, written out from the RFC (not the library under use)."""
    prk = hmac.new(b"\0" * 32, secret, hashlib.sha256).digest()
    out, block, n = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([n]), hashlib.sha256).digest()
        out, n = out + block, n + 1
    return out[:length]


def test_epoch_key_is_hkdf_of_the_secret_split_name_aes_hmac() -> None:
    """An epoch's key is HKDF-SHA256(secret, "edgeproxy ticket" + epoch) cut 16/32/32."""
    secret = bytes(range(32))
    for epoch in (-1, 0, 1, 17_999_999):
        okm = _hkdf_sha256(secret, b"edgeproxy ticket" + epoch.to_bytes(8, "big", signed=True), 80)
        k = tickets.derive(secret, epoch)
        assert (k.epoch, k.name, k.aes, k.hmac) == (epoch, okm[:16], okm[16:48], okm[48:])


@given(st.integers(-(2**40), 2**40), st.integers(-4, 4), st.floats(0, 0.999))
def test_window_accepts_previous_current_next_and_renews_all_but_current(
    now_epoch: int, offset: int, frac: float
) -> None:
    """A ticket key is known iff its epoch is within one of now's; only the current one is
    used to encrypt, and a ticket under any other known key is to be renewed."""
    period = 60.0
    now = [(now_epoch + frac) * period]
    keys = tickets.TicketKeys(b"s" * 32, period, lambda: now[0])
    assert keys.current() == tickets.derive(b"s" * 32, now_epoch)
    name = tickets.derive(b"s" * 32, now_epoch + offset).name
    found = keys.lookup(name)
    if abs(offset) <= 1:
        assert found is not None
        assert found[0].epoch == now_epoch + offset
        assert found[1] is (offset != 0)
    else:
        assert found is None


def test_window_moves_with_the_clock_and_other_secrets_are_unknown() -> None:
    """When the clock crosses an epoch the window moves; a key of another secret is never known."""
    now = [0.5 * PERIOD]
    keys = tickets.TicketKeys(b"a" * 32, PERIOD, lambda: now[0])
    k0 = keys.current()
    now[0] = 1.5 * PERIOD
    assert keys.current().epoch == 1
    assert keys.lookup(k0.name) == (k0, True)
    now[0] = 2.5 * PERIOD
    assert keys.lookup(k0.name) is None
    assert keys.lookup(tickets.derive(b"b" * 32, 2).name) is None
    assert keys.lookup(b"\0" * 16) is None


def test_secret_and_period_are_checked() -> None:
    """A short secret or a silly period is refused at construction, not at the first handshake."""
    assert len(tickets.new_secret()) == 32
    assert tickets.new_secret() != tickets.new_secret()
    with pytest.raises(ValueError, match="secret"):
        tickets.TicketKeys(b"short", 60)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="period"):
            tickets.TicketKeys(b"k" * 32, bad)


# -- the checks before install ------------------------------------------------------


def test_the_libssl_found_is_the_one_ssl_runs_on() -> None:
    """The libssl reached through ctypes is the loaded one, with ssl's exact version string."""
    lib = libssl.loaded()
    assert lib.lib.OpenSSL_version(0).decode() == ssl.OPENSSL_VERSION
    with open("/proc/self/maps") as f:
        assert lib.path in f.read()


def test_libssl_is_refused_when_not_exactly_one_is_mapped() -> None:
    """No libssl mapped (a static _ssl) or two of them: nothing is guessed."""
    line = "7f0000000000-7f0000001000 r-xp 00000000 08:01 1 {}\n"
    with pytest.raises(libssl.UnavailableError, match="none"):
        libssl.find(maps=line.format("/usr/lib/libc.so.6"))
    two = line.format("/a/libssl.so.3") + line.format("/b/libssl.so.1.1")
    with pytest.raises(libssl.UnavailableError, match="expected one"):
        libssl.find(maps=two)


def test_readable_probe_tells_mapped_from_unmapped() -> None:
    """The probe that guards the SSL_CTX* says no for NULL and unmapped pages, yes for a buffer."""
    buf = ctypes.create_string_buffer(64)
    assert libssl.readable(ctypes.addressof(buf), 64)
    assert not libssl.readable(0, 8)
    assert not libssl.readable(8, 8)


def test_server_context_pointer_passes_every_check() -> None:
    """The SSL_CTX* of a server context is found and agrees with it (method, options, ...)."""
    lib = libssl.loaded()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ptr = libssl.ctx_pointer(lib, ctx)
    assert lib.lib.SSL_CTX_get_options(ptr) == ctx.options
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    assert libssl.ctx_pointer(lib, ctx) == ptr  # still agrees after a change through Python


@pytest.mark.parametrize("offset", [0, 8, 24, 40, 48])
def test_a_pointer_read_from_the_wrong_place_is_refused(offset: int) -> None:
    """Read at a wrong offset (the refcount, the type object, the ALPN buffer, int fields), the
    candidate fails a check (alignment, mapping, method) before OpenSSL is asked anything else."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_alpn_protocols(["http/1.1"])  # a heap buffer right after SSL_CTX*: readable
    with pytest.raises(libssl.UnavailableError):
        libssl.ctx_pointer(libssl.loaded(), ctx, offset=offset)


def test_install_refuses_what_it_cannot_check_and_changes_nothing() -> None:
    """A client context or a non-context: False, a reason, the context untouched."""
    keys = tickets.TicketKeys(tickets.new_secret(), 3600)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.options |= ssl.OP_NO_TICKET
    before = client.options
    assert tickets.install(client, keys) is False
    assert "client" in tickets.last_failure()
    assert client.options == before
    assert tickets.install(object(), keys) is False  # type: ignore[arg-type]
    assert "not an ssl.SSLContext" in tickets.last_failure()


def test_install_turns_tickets_on() -> None:
    """A server context that had tickets off (OP_NO_TICKET, num_tickets 0) issues them after."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    assert tickets.install(ctx, tickets.TicketKeys(tickets.new_secret(), 3600)) is True
    assert not ctx.options & ssl.OP_NO_TICKET
    assert ctx.num_tickets == tickets.DEFAULT_TICKETS


class _Ctxs:
    """A fresh EVP_CIPHER_CTX and HMAC EVP_MAC_CTX, as OpenSSL hands the callback per ticket."""

    def __init__(self) -> None:
        f = libssl.loaded().lib
        vp = ctypes.c_void_p
        f.EVP_CIPHER_CTX_new.restype = vp
        f.EVP_CIPHER_CTX_free.argtypes = (vp,)
        f.EVP_MAC_fetch.restype = vp
        f.EVP_MAC_fetch.argtypes = (vp, ctypes.c_char_p, ctypes.c_char_p)
        f.EVP_MAC_CTX_new.restype = vp
        f.EVP_MAC_CTX_new.argtypes = (vp,)
        f.EVP_MAC_CTX_free.argtypes = (vp,)
        f.EVP_MAC_free.argtypes = (vp,)
        self.f = f
        self.cipher = f.EVP_CIPHER_CTX_new()
        self.mac = f.EVP_MAC_fetch(None, b"HMAC", None)
        self.hmac = f.EVP_MAC_CTX_new(self.mac)

    def close(self) -> None:
        self.f.EVP_CIPHER_CTX_free(self.cipher)
        self.f.EVP_MAC_CTX_free(self.hmac)
        self.f.EVP_MAC_free(self.mac)


def _new_ticket(keys: tickets.TicketKeys) -> tuple[int, bytes, bytes]:
    """Call the installed callback the way OpenSSL does to make a ticket: (result, name, IV)."""
    cb = keys._callback
    assert cb is not None
    name, iv = ctypes.create_string_buffer(16), ctypes.create_string_buffer(16)
    c = _Ctxs()
    try:
        rc = cb.cfunc(0, ctypes.addressof(name), ctypes.addressof(iv), c.cipher, c.hmac, 1)
    finally:
        c.close()
    return rc, name.raw, iv.raw


def test_every_ticket_gets_its_own_iv_also_in_a_forked_child() -> None:
    """CBC under one key needs unrepeated IVs: none repeats over several RAND_bytes batches,
    and a forked child draws its own batch instead of replaying the parent's."""
    keys = tickets.TicketKeys(tickets.new_secret(), 3600)
    assert tickets.install(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), keys)
    made = [_new_ticket(keys) for _ in range(tickets.IV_BATCH * 2 + 7)]
    assert {rc for rc, _, _ in made} == {1}
    assert {name for _, name, _ in made} == {keys.current().name}
    ivs = {iv for _, _, iv in made}
    assert len(ivs) == len(made)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one ticket, its IV to the parent, and out
        try:
            os.write(w, _new_ticket(keys)[2])
        finally:
            os._exit(0)
    os.close(w)
    child_iv = os.read(r, 16)
    os.close(r)
    os.waitpid(pid, 0)
    assert len(child_iv) == 16
    parent_iv = _new_ticket(keys)[2]
    assert child_iv != parent_iv
    assert child_iv not in ivs


# -- real handshakes between processes ----------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_ticket_from_one_process_resumes_on_another(pki: tuple[Path, Path], version: str) -> None:
    """A ticket issued by server process A resumes on process B and B's on A (same secret);
    a TLS 1.3 resumption hands out a fresh ticket."""
    bundle, ca = pki
    secret = tickets.new_secret()
    with TicketServer(bundle, secret) as a, TicketServer(bundle, secret) as b:
        assert a.installed and b.installed
        c = client_context(ca, version)
        first = talk(a.port, c)
        assert not first.reused
        assert first.session is not None and first.session.has_ticket
        assert first.session.ticket_lifetime_hint == 3600  # the key period
        on_b = talk(b.port, c, first.session)
        assert on_b.reused
        assert _pid(on_b.reply) != _pid(first.reply)
        # A fresh ticket after a TLS 1.3 resumption (clients use each once, RFC 8446 C.4);
        # TLS 1.2 keeps its ticket while the key is current (OpenSSL's own behaviour).
        assert on_b.session is not None
        assert (on_b.session.id != first.session.id) is (version == "1.3")
        assert talk(a.port, c, on_b.session).reused
        assert a.stats() == b.stats() == {"failed": 0, "cb_errors": 0}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("b_args", [("other secret",), ("--no-install",)], ids=["secret", "off"])
def test_no_shared_keys_means_a_full_handshake_that_works(
    pki: tuple[Path, Path], version: str, b_args: tuple[str]
) -> None:
    """A ticket B cannot read (another secret, or no keys installed): full handshake, served."""
    bundle, ca = pki
    secret = tickets.new_secret()
    b_secret, extra = (
        (tickets.new_secret(), ()) if b_args == ("other secret",) else (secret, b_args)
    )
    with TicketServer(bundle, secret) as a, TicketServer(bundle, b_secret, *extra) as b:
        c = client_context(ca, version)
        first = talk(a.port, c)
        on_b = talk(b.port, c, first.session)
        assert not on_b.reused
        assert "reused=0" in on_b.reply
        assert talk(b.port, c, on_b.session).reused  # B's own ticket does resume on B
        assert b.stats()["failed"] == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_rotation_previous_epoch_resumes_and_is_renewed_two_back_does_not(
    pki: tuple[Path, Path], version: str
) -> None:
    """After one rotation an old ticket resumes (elsewhere) and comes back renewed; after two
    it gets a full handshake while the renewed one still resumes; one epoch of skew is fine."""
    bundle, ca = pki
    secret = tickets.new_secret()
    clock = ("--clock", str(0.5 * PERIOD))
    with (
        TicketServer(bundle, secret, *clock, period=PERIOD) as a,
        TicketServer(bundle, secret, *clock, period=PERIOD) as b,
    ):
        c = client_context(ca, version)
        old = talk(a.port, c)  # epoch 0
        b.set_clock(1.5 * PERIOD)  # epoch 1 on B
        renewed = talk(b.port, c, old.session)
        assert renewed.reused
        a.set_clock(2.5 * PERIOD)  # epoch 2 on A: epoch 0 is two back
        expired = talk(a.port, c, old.session)
        assert not expired.reused
        assert "reused=0" in expired.reply
        assert talk(a.port, c, renewed.session).reused  # renewed under epoch 1's key
        # Skew: a ticket from A (epoch 2) offered to B (epoch 1, one behind) resumes.
        assert talk(b.port, c, expired.session).reused
        b.set_clock(0.5 * PERIOD)  # two behind: unknown
        assert not talk(b.port, c, expired.session).reused
        assert a.stats()["failed"] == b.stats()["failed"] == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_uvloop_servers_issue_and_resume(pki: tuple[Path, Path], version: str) -> None:
    """uvloop's create_server(ssl=) and connect_accepted_socket(ssl=) (OpenSSL through
    SSLObject and memory BIOs) issue tickets that resume on each other and on blocking sockets."""
    bundle, ca = pki
    secret = tickets.new_secret()
    with (
        TicketServer(bundle, secret, "--loop", "uvloop") as u,
        TicketServer(bundle, secret, "--loop", "accepted") as acc,
        TicketServer(bundle, secret, "--loop", "stdlib") as std,
    ):
        c = client_context(ca, version)
        r = talk(u.port, c)
        assert not r.reused
        for server in (acc, std, u, acc):
            r = talk(server.port, c, r.session)
            assert r.reused, server.proc.args
        for server in (u, acc, std):
            assert server.stats() == {"failed": 0, "cb_errors": 0}


@pytest.mark.parametrize("version", VERSIONS)
def test_legacy_callback_reads_the_same_tickets(pki: tuple[Path, Path], version: str) -> None:
    """The pre-OpenSSL-3 callback (HMAC_CTX) makes and reads the very tickets the EVP one does."""
    bundle, ca = pki
    secret = tickets.new_secret()
    with TicketServer(bundle, secret, "--legacy") as old, TicketServer(bundle, secret) as new:
        c = client_context(ca, version)
        r = talk(old.port, c)
        r = talk(new.port, c, r.session)
        assert r.reused
        assert talk(old.port, c, r.session).reused


@pytest.mark.parametrize("version", VERSIONS)
def test_a_failing_key_source_means_no_tickets_never_a_failed_handshake(
    pki: tuple[Path, Path], version: str
) -> None:
    """If the callback raises (here its clock), connections are served without tickets and
    the errors are counted: resumption degrades, service does not."""
    bundle, ca = pki
    with TicketServer(bundle, tickets.new_secret(), "--clock-raises") as a:
        c = client_context(ca, version)
        for _ in range(2):
            r = talk(a.port, c)
            assert "reused=0" in r.reply
            assert r.session is None or not r.session.has_ticket
        stats = a.stats()
        assert stats["failed"] == 0
        assert stats["cb_errors"] >= 2


# -- hostile tickets ------------------------------------------------------------------


def _u8(b: bytes) -> bytes:
    return bytes([len(b)]) + b


def _u16(b: bytes) -> bytes:
    return len(b).to_bytes(2, "big") + b


def _ext(kind: int, body: bytes) -> bytes:
    return kind.to_bytes(2, "big") + _u16(body)


def _hello12(ticket: bytes, session_id: bytes) -> bytes:
    """A TLS 1.2 ClientHello (ECDHE-ECDSA, P-256/X25519) carrying `ticket` (RFC 5077)."""
    exts = (
        _ext(0, _u16(b"\x00" + _u16(b"a.test")))
        + _ext(10, _u16(b"\x00\x1d\x00\x17"))
        + _ext(11, _u8(b"\x00"))
        + _ext(13, _u16(b"\x04\x03\x08\x04\x04\x01"))
        + _ext(23, b"")
        + _ext(0xFF01, b"\x00")
        + _ext(35, ticket)
    )
    suites = b"\xc0\x2b\xc0\x2c\xc0\x2f\xc0\x30"
    body = b"\x03\x03" + os.urandom(32) + _u8(session_id) + _u16(suites) + _u8(b"\x00")
    body += _u16(exts)
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + _u16(hs)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = s.recv(n - len(out))
        if not data:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += data
    return out


def _server_flight(port: int, ticket: bytes) -> tuple[bool, list[int]]:
    """Send a hello with `ticket`; whether the ServerHello echoes our session id (it does
    when resuming, RFC 5077 3.4) and the types of the server's first handshake messages
    (a ChangeCipherSpec record shows as -20, an alert as -21)."""
    sid = os.urandom(32)
    with socket.create_connection((HOST, port), timeout=IO_TIMEOUT) as s:
        s.sendall(_hello12(ticket, sid))
        hs, kinds, echoed = b"", [], b""
        while len(kinds) < 2:
            head = _recv_exact(s, 5)
            ctype, length = head[0], int.from_bytes(head[3:5], "big")
            payload = _recv_exact(s, length)
            if ctype != 22:
                kinds.append(-ctype)
                continue
            hs += payload
            while len(hs) >= 4 and len(hs) >= 4 + int.from_bytes(hs[1:4], "big"):
                n = int.from_bytes(hs[1:4], "big")
                msg, hs = hs[: 4 + n], hs[4 + n :]
                if msg[0] == 2:  # ServerHello: version, random, then the session id
                    echoed = msg[4 + 34 + 1 : 4 + 34 + 1 + msg[4 + 34]]
                kinds.append(msg[0])
        return echoed == sid, kinds


def test_garbage_tickets_get_a_full_handshake_and_harm_nothing(pki: tuple[Path, Path]) -> None:
    """Tickets of every odd size, unknown key names, and a known key name over garbage: the
    server answers ServerHello + Certificate (a full handshake), stays up, still resumes."""
    bundle, ca = pki
    secret = tickets.new_secret()
    now = 0.5 * PERIOD
    name = tickets.derive(secret, 0).name
    prev = tickets.derive(secret, -1).name
    garbage = [
        b"\x00",
        os.urandom(31),  # shorter than key name + IV: never reaches the callback
        os.urandom(32),  # key name + IV, nothing else
        os.urandom(200),
        os.urandom(4000),
        name + os.urandom(16),  # a known name, no MAC
        name + os.urandom(200),  # a known name, forged body: the MAC check fails
        prev + os.urandom(300),
        name + b"\x00" * 48,
    ]
    with (
        TicketServer(bundle, secret, "--clock", str(now), period=PERIOD) as a,
        TicketServer(bundle, secret, "--clock", str(now), period=PERIOD) as b,
    ):
        for ticket in garbage:
            echoed, kinds = _server_flight(a.port, ticket)
            assert kinds[:2] == [2, 11], (len(ticket), kinds)
            assert not echoed
        assert a.alive()
        assert a.stats()["cb_errors"] == 0
        c = client_context(ca, "1.2")
        assert talk(b.port, c, talk(a.port, c).session).reused


def _s_client(port: int, ca: Path, version: str, sess_in: Path | None, sess_out: Path) -> str:
    """`openssl s_client` through one exchange; its New/Reused line and the server's reply."""
    argv = ["openssl", "s_client", "-connect", f"{HOST}:{port}", "-servername", "a.test"]
    argv += ["-CAfile", str(ca), "-verify_return_error", "-ign_eof", f"-tls1_{version[-1]}"]
    argv += ["-sess_out", str(sess_out)]
    if sess_in is not None:
        argv += ["-sess_in", str(sess_in)]
    done = subprocess.run(argv, input=b"hello\n", capture_output=True, timeout=30, check=False)
    lines = done.stdout.decode(errors="replace").splitlines()
    keep = [ln for ln in lines if ln.startswith(("New,", "Reused,", "pid="))]
    return " | ".join(keep)


def _tamper(pem: Path, out: Path, find: bytes, replace: bytes) -> None:
    """A copy of an s_client session file with bytes of its ticket replaced (same length)."""
    text = pem.read_text()
    b64 = "".join(ln for ln in text.splitlines() if not ln.startswith("-----"))
    der = base64.b64decode(b64)
    at = der.index(find)
    der = der[:at] + replace + der[at + len(replace) :]
    body = base64.encodebytes(der).decode()
    out.write_text(
        "-----BEGIN SSL SESSION PARAMETERS-----\n" + body + "-----END SSL SESSION PARAMETERS-----\n"
    )


@needs(shutil.which("openssl") is not None, "the openssl command is not installed")
@pytest.mark.parametrize("version", VERSIONS)
def test_openssl_s_client_resumes_across_processes_and_survives_tampering(
    pki: tuple[Path, Path], tmp_path: Path, version: str
) -> None:
    """openssl s_client -sess_out on A, -sess_in on B: Reused; the same session with its
    ticket's key name or body altered: New (full handshake), served, and both servers live."""
    bundle, ca = pki
    secret = tickets.new_secret()
    clock = ("--clock", str(0.5 * PERIOD))
    name = tickets.derive(secret, 0).name
    with (
        TicketServer(bundle, secret, *clock, period=PERIOD) as a,
        TicketServer(bundle, secret, *clock, period=PERIOD) as b,
    ):
        sess = tmp_path / "a.pem"
        out = _s_client(a.port, ca, version, None, sess)
        assert out.startswith(f"New, TLSv{version}"), out
        out = _s_client(b.port, ca, version, sess, tmp_path / "b.pem")
        assert out.startswith(f"Reused, TLSv{version}") and "reused=1" in out, out
        cases = {
            "unknown name": (name, os.urandom(16)),
            "forged body": (name, name + os.urandom(48)),
        }
        for what, (find, replace) in cases.items():
            bad = tmp_path / f"bad-{what.replace(' ', '-')}.pem"
            _tamper(sess, bad, find, replace)
            out = _s_client(b.port, ca, version, bad, tmp_path / "x.pem")
            assert out.startswith(f"New, TLSv{version}") and "reused=0" in out, (what, out)
        assert a.alive() and b.alive()
        assert b.stats() == {"failed": 0, "cb_errors": 0}
