"""Micro-benchmarks of the ClientHello parser: µs per parse of the hellos an edge sees.

    .venv/bin/pytest bench/bench_clienthello.py --benchmark-only -p no:cacheprovider
    .venv/bin/python -m bench.bench_clienthello      # the same, stored in bench/results/

It measures the build in place: compiled when `./dev build` (or setup.py build_ext
--inplace) left proxy/core/clienthello*.so, pure Python otherwise; the stored file names
which. Cases: Python ssl's TLS 1.3 hello (SNI + ALPN h2/http1.1, 517 bytes, the typical
one), a browser-sized one (X25519MLKEM768 share, GREASE, padding: ~1.9 KiB), the same in
5 records, an HTTP request refused at its first byte, and the shell's first peek (a
partial record: the parser only asks for more).
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from proxy.core import clienthello
from proxy.core.clienthello import Hello, HelloError, parse_client_hello
from tests.support.hello_builder import COMMON, GREASE, Spec, build, u16
from tests.support.hello_capture import python_hello

RESULTS = Path(__file__).resolve().parent / "results"


def build_kind() -> str:
    return "compiled" if clienthello.__file__.endswith(".so") else "pure"


def browser_spec(fragments: list[int] | None = None) -> Spec:
    share = u16(0x11EC) + u16(1216) + bytes(1216) + u16(0x001D) + u16(32) + bytes(32)
    extras = [
        (GREASE[0], b""),
        (51, u16(len(share)) + share),
        *COMMON[:-2],
        (21, bytes(400)),
        (GREASE[5], b"\x00"),
    ]
    return Spec(
        sni=b"www.example.com",
        alpn=[b"h2", b"http/1.1"],
        extras=extras,
        fragments=fragments or [],
    )


TYPICAL = python_hello("app.example.com", ["h2", "http/1.1"])
BROWSER = build(browser_spec())
BROWSER_SPLIT = build(browser_spec([400, 400, 400, 400]))


@pytest.mark.parametrize(
    "data", [TYPICAL, BROWSER, BROWSER_SPLIT], ids=["python-ssl-517B", "browser-1.9K", "5-records"]
)
def test_parse_hello(benchmark: BenchmarkFixture, data: bytes) -> None:
    benchmark.extra_info["build"] = build_kind()
    got = benchmark(parse_client_hello, data)
    assert isinstance(got, Hello)
    assert got.size == len(data)


def test_first_peek_partial_record(benchmark: BenchmarkFixture) -> None:
    benchmark.extra_info["build"] = build_kind()
    got = benchmark(parse_client_hello, BROWSER[:1448])
    assert got == len(BROWSER)


def test_refuse_plain_http(benchmark: BenchmarkFixture) -> None:
    benchmark.extra_info["build"] = build_kind()

    def run() -> str:
        try:
            parse_client_hello(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        except HelloError as e:
            return e.reason
        return ""

    assert benchmark(run) == "not_tls"


def main() -> None:
    """Run this file under pytest-benchmark and store its output with the machine."""
    uname = platform.uname()
    load = os.getloadavg()
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        __file__,
        "--benchmark-only",
        "-p",
        "no:cacheprovider",
        "-q",
        "--benchmark-columns=min,median,mean,stddev,rounds",
    ]
    run = subprocess.run(cmd, check=False, capture_output=True, text=True)
    head = [
        f"date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
        f"machine: {uname.system} {uname.release} {uname.machine}, nproc {os.cpu_count()}",
        f"python: {sys.version.split()[0]}, niceness {os.nice(0)}",
        f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        f"build: {build_kind()} ({clienthello.__file__})",
        f"command: {' '.join(sys.orig_argv)} -> {' '.join(cmd)}",
        "",
    ]
    text = "\n".join(head) + run.stdout + run.stderr
    print(text, end="")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M")
    out = RESULTS / f"bench-clienthello-{stamp}-{build_kind()}.txt"
    out.write_text(text)
    print(f"written: {out}")
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
