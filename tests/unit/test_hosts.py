"""Host -> app with one-label wildcards: the matcher, config validation, end to end."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from proxyctl import Proxy, Upstream

from proxy.config import ConfigError, load
from shm.hosts import app_for_host

pytestmark = pytest.mark.timeout(30)

label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
suffix = st.lists(label, min_size=2, max_size=4).map(".".join)


@given(left=label, deeper=label, base=suffix)
def test_wildcard_covers_exactly_one_leftmost_label(left: str, deeper: str, base: str) -> None:
    """`*.base` matches `left.base`, never `base` itself nor `deeper.left.base`."""
    hosts = {"*." + base: "w"}
    assert app_for_host(hosts, f"{left}.{base}") == "w"
    assert app_for_host(hosts, base) is None
    assert app_for_host(hosts, f"{deeper}.{left}.{base}") is None
    assert app_for_host(hosts, "*." + base) is None  # a pattern is no host
    assert app_for_host(hosts, "." + base) is None  # an empty label is no label


@given(left=label, base=suffix, other=suffix)
def test_exact_host_wins_and_other_domains_miss(left: str, base: str, other: str) -> None:
    """An exact entry beats the wildcard of its parent; a host under another domain misses."""
    hosts = {"*." + base: "w", f"{left}.{base}": "e"}
    assert app_for_host(hosts, f"{left}.{base}") == "e"
    assert app_for_host(hosts, base) is None
    if not f".{other}".endswith(f".{base}") and other != base:
        assert app_for_host(hosts, f"{left}.{other}") is None


def app_config(tmp_path: Path, hosts: list[str]) -> Path:
    """A minimal config whose one app claims `hosts`."""
    path = tmp_path / "h.toml"
    path.write_text(
        '[node]\nid = "n"\n[listen]\nhttp = ["127.0.0.1:1"]\n'
        f'[[app]]\nname = "a"\nhosts = {hosts!r}\n'.replace("'", '"')
    )
    return path


@pytest.mark.parametrize("host", ["*", "a*.x.y", "*x.y.z", "x.*.y", "*.test", "*.*.x.y", "*."])
def test_config_refuses_bad_wildcards(tmp_path: Path, host: str) -> None:
    """`*` is allowed only as the whole leftmost label with two or more labels after it."""
    with pytest.raises(ConfigError, match="not a valid host name"):
        load(str(app_config(tmp_path, [host])))


def test_config_accepts_one_label_wildcard(tmp_path: Path) -> None:
    """`*.example.test` is a valid host entry and is kept as written, lower-cased."""
    assert dict(load(str(app_config(tmp_path, ["*.Example.test"]))).hosts) == {
        "*.example.test": "a"
    }


@pytest.mark.request_path
@pytest.mark.parametrize("writer", ["master", "pinger"], ids=["table", "static"])
def test_wildcard_routes_end_to_end(
    proxy_factory: Callable[..., Proxy], upstream: Upstream, writer: str
) -> None:
    """Through a running proxy, from the table (writer = master) and from the config (no
    table): `*.wild.test` serves one label below it, an exact host wins over it, and the
    bare domain or two labels below get 404."""
    p = proxy_factory(
        table_extra={"writer": writer},
        extra_apps=[
            {"name": "wild", "hosts": ["*.wild.test"], "soft_limit": 5, "hard_limit": 5},
            {"name": "exact", "hosts": ["x.wild.test"], "soft_limit": 5, "hard_limit": 5},
        ],
        extra_instances=[
            {"app": "wild", "id": "wild-1", "address": upstream.address},
            {"app": "exact", "id": "exact-1", "address": "127.0.0.1:1"},
        ],
    )
    assert p.get("/", host="a.wild.test").status == 200
    assert p.get("/", host="A.Wild.Test:80").status == 200
    assert p.get("/", host="x.wild.test").status == 502  # exact app: a dead instance
    assert p.get("/", host="wild.test").status == 404
    assert p.get("/", host="a.b.wild.test").status == 404
