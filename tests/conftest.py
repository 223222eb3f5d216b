"""Fixtures for the end-to-end tests: an upstream subprocess and proxy processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from build_check import stale_compiled
from ci_policy import skip_or_fail
from consul_double import ConsulDouble
from etcd_harness import EtcdCluster, require_etcd
from proxyctl import Proxy, ProxyConfig, Upstream, stop_proxies


def pytest_report_header() -> str:
    import proxy

    return f"edgeproxy: {proxy.build()}"


def pytest_configure(config: pytest.Config) -> None:
    stale = stale_compiled()
    if stale:
        raise pytest.UsageError(
            f"the compiled request path is older than {', '.join(stale)}: the tests would "
            "run the old code. Rebuild it (./dev build, or ./dev test does it)."
        )


PROXY_FIXTURES = frozenset({"proxy_factory", "shared_proxy", "proxy"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts a proxy through the fixtures carries the request_path mark, so the
    pure-Python CI step (`-m request_path`) cannot miss it."""
    for item in items:
        uses = PROXY_FIXTURES & set(getattr(item, "fixturenames", ()))
        if uses and item.get_closest_marker("request_path") is None:
            raise pytest.UsageError(
                f"{item.nodeid} uses {sorted(uses)} but is not marked request_path"
            )


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked `needs` whose requirement is missing is skipped, or fails in CI."""
    for mark in item.iter_markers("needs"):
        if not mark.kwargs["present"]:
            skip_or_fail(mark.kwargs["reason"])


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    """One controllable upstream per test module (tests/support/upstream.py)."""
    up = Upstream()
    yield up
    up.stop()


def _start(cfg: ProxyConfig, workdir: Path, started: list[Proxy]) -> Proxy:
    p = Proxy(cfg, workdir)
    started.append(p)
    return p


@pytest.fixture
def proxy_factory(tmp_path: Path, upstream: Upstream) -> Iterator[Callable[..., Proxy]]:
    """Start a proxy with config overrides; stopped with SIGTERM at teardown."""
    started: list[Proxy] = []

    def make(**kw: Any) -> Proxy:
        kw.setdefault("upstream", upstream.address)
        return _start(ProxyConfig(**kw), tmp_path, started)

    yield make
    stop_proxies(started)


@pytest.fixture(scope="module")
def shared_proxy(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Proxy]:
    """One 2-worker proxy with default limits, shared by a module's tests."""
    started: list[Proxy] = []
    workdir = tmp_path_factory.mktemp("proxy")
    p = _start(ProxyConfig(upstream=upstream.address), workdir, started)
    yield p
    stop_proxies(started)


@pytest.fixture
def proxy(shared_proxy: Proxy) -> Iterator[Proxy]:
    """The shared proxy, checked after the test: same workers, no leaked client sockets."""
    before = shared_proxy.serving_pids()
    assert len(before) == 2, f"expected 2 serving workers, status says {before}"
    yield shared_proxy
    left = shared_proxy.wait_no_client_connections(timeout=5)
    assert not left, f"proxy still holds client connections after the test: {left}"
    after = shared_proxy.serving_pids()
    assert after == before, f"worker pids changed during the test: {before} -> {after}"


def _etcd(members: int, where: Path) -> Iterator[EtcdCluster]:
    require_etcd()
    c = EtcdCluster(members, where)
    c.start()
    yield c
    c.close()


@pytest.fixture
def etcd1(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A one-member etcd of this test's own (tests/support/etcd_harness.py), stopped at teardown."""
    yield from _etcd(1, tmp_path / "etcd")


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A three-member etcd cluster on loopback ports, stopped at teardown."""
    yield from _etcd(3, tmp_path / "etcd3")


@pytest.fixture
def consul() -> Iterator[ConsulDouble]:
    """The Consul double on a free 127.0.0.1 port, sessions down to a 1 s TTL."""
    d = ConsulDouble(session_ttl_min=1.0)
    d.start()
    yield d
    d.close()
