"""Node configuration: TOML in, immutable validated records out.

Owns the schema, its defaults and every validation rule. Errors name the file
and the key (`edgeproxy.toml: app[1].hard_limit: must be >= soft_limit (20)`).
It must not open sockets or touch any running state: loading is pure.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from proxy.config_http2 import Http2Config, http2_section
from proxy.config_log import LogConfig, log_section
from proxy.config_metrics import MetricsConfig, metrics_section
from proxy.config_overload import OverloadConfig, overload_section
from proxy.config_reader import (
    HOST_RE,
    Address,
    ConfigError,
    Reader,
    default_control,
    default_control_dir,
    parse_address,
)
from proxy.config_tls import BackhaulConfig, TlsConfig, backhaul_section, tls_section
from proxy.config_tracing import TracingConfig, tracing_section

# Re-exported: the rest of the project takes these from proxy.config.
__all__ = [
    "CLOSEST",
    "LEASTLOAD",
    "STRATEGIES",
    "Address",
    "BackhaulConfig",
    "Config",
    "ConfigError",
    "LogConfig",
    "MetricsConfig",
    "OverloadConfig",
    "TlsConfig",
    "TracingConfig",
    "default_control_dir",
    "load",
    "loads",
    "parse_address",
]

T = TypeVar("T")

CLOSEST: Final = "closest"  # lowest RTT under the soft limit (proxy.core.router)
LEASTLOAD: Final = "leastload"  # least loaded of a random sample (proxy.core.router)
STRATEGIES: Final = (CLOSEST, LEASTLOAD)
STORES = ("none", "etcd", "consul")
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 5.6.2 token


@dataclass(frozen=True, slots=True)
class NodeConfig:
    id: str
    region: str


@dataclass(frozen=True, slots=True)
class ListenConfig:
    http: tuple[Address, ...]
    backhaul: Address | None
    admin: Address | None
    control: str  # unix socket of the master (status, reload, takeover)
    https: tuple[Address, ...] = ()  # TLS-terminating client listeners ([tls])
    h2c: bool = False  # HTTP/2 with prior knowledge on the plaintext (http) listeners too


@dataclass(frozen=True, slots=True)
class WorkersConfig:
    count: int
    drain_timeout: float
    quiet_period: float  # idle keep-alive closed after this long during a drain


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    connect: float  # upstream (local instance) connect
    backhaul_connect: float
    upstream_response: float  # until the upstream's response headers
    client_header: float  # until a request's whole head arrived (slowloris)
    client_idle: float  # keep-alive idle between requests
    request: float  # a whole request, first byte to last response byte
    abandoned: float = 2.0  # an instance's answer awaited (and counted) after its client left
    tunnel_idle: float = 600.0  # an upgraded connection (WebSocket) with no byte either way
    tls_handshake: float = 10.0  # accept to a finished TLS handshake (ClientHello included)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_header_bytes: int
    max_headers: int
    replay_body_bytes: int  # request bodies kept for a retry
    max_connections: int = 8192  # client connections per worker; accepting pauses at the cap
    response_buffer: int = 262144  # response bytes held for a slow client before backpressure
    pipeline_depth: int = 16  # requests one connection may queue before reading pauses
    pipeline_bytes: int = 262144  # bytes (heads and bodies) they may hold before it pauses


@dataclass(frozen=True, slots=True)
class TrustConfig:
    # Clients whose X-Forwarded-*/Forwarded fields are kept (appended to); others' replaced.
    forwarded_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # Upgrade protocols that may become a tunnel (lower-case tokens; h2c never).
    upgrade: frozenset[str] = frozenset({"websocket"})


@dataclass(frozen=True, slots=True)
class PoolConfig:
    max_idle: int  # idle keep-alive connections per instance per worker
    idle_timeout: float


@dataclass(frozen=True, slots=True)
class PingerConfig:
    listen: Address
    advertise: Address
    interval: float
    down_after: int
    up_after: int
    load_publish_ms: int
    loss_window: int = 100  # probes in the sliding loss window


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    store: str
    endpoints: tuple[str, ...]
    ttl: float
    prefix: str


@dataclass(frozen=True, slots=True)
class TableConfig:
    name: str  # posix shared memory name (without the layout version suffix)
    max_nodes: int
    max_apps: int
    max_instances: int
    stale_after: float
    writer: str = "master"  # who fills the table: "master" (static, from this file) | "pinger"
    max_workers: int = 64  # in-flight counter columns (live workers of all generations)
    max_local_instances: int = 256


@dataclass(frozen=True, slots=True)
class AppConfig:
    name: str
    hosts: tuple[str, ...]
    strategy: str
    soft_limit: int
    hard_limit: int
    sample_k: int


@dataclass(frozen=True, slots=True)
class InstanceConfig:
    app: str
    id: str
    address: Address
    node: str  # the node that runs it; this node's id when local


@dataclass(frozen=True, slots=True)
class PeerConfig:
    id: str
    region: str
    backhaul: Address
    ping: Address
    rtt_ms: float | None


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    node: NodeConfig
    listen: ListenConfig
    workers: WorkersConfig
    timeouts: TimeoutsConfig
    limits: LimitsConfig
    pool: PoolConfig
    pinger: PingerConfig
    cluster: ClusterConfig
    table: TableConfig
    apps: tuple[AppConfig, ...]
    instances: tuple[InstanceConfig, ...]
    peers: tuple[PeerConfig, ...]
    hosts: Mapping[str, str] = field(default_factory=dict)  # lower-case host -> app
    trust: TrustConfig = field(default_factory=TrustConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    backhaul: BackhaulConfig = field(default_factory=BackhaulConfig)
    overload: OverloadConfig = field(default_factory=OverloadConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    http2: Http2Config = field(default_factory=Http2Config)

    def app(self, name: str) -> AppConfig:
        for a in self.apps:
            if a.name == name:
                return a
        raise KeyError(name)

    def local_instances(self) -> tuple[InstanceConfig, ...]:
        return tuple(i for i in self.instances if i.node == self.node.id)


def control_path(path: str) -> str:
    """Where the master of the config at `path` listens for control, even if the file
    no longer validates (status must work while a broken edit waits to be fixed)."""
    try:
        return load(path).listen.control
    except ConfigError:
        pass
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return default_control("local")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:  # mid-edit: salvage the two keys line by line
        data = _salvage(text, {"listen": "control", "node": "id"})
    listen = data.get("listen")
    node = data.get("node")
    if isinstance(listen, dict) and isinstance(listen.get("control"), str):
        return str(listen["control"])
    node_id = node.get("id") if isinstance(node, dict) else None
    return default_control(node_id if isinstance(node_id, str) else "local")


def _salvage(text: str, wanted: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """`{table: {key: value}}` for the one-line `key = value` entries of `wanted` found
    under their `[table]` header in a file that does not parse as a whole; each line is
    parsed alone (TOML), so a syntax error elsewhere costs nothing."""
    out: dict[str, dict[str, Any]] = {}
    table = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            table = line.strip("[] \t").split("]")[0].strip()
            continue
        key = wanted.get(table)
        if key is None or not line.startswith(key):
            continue
        try:
            value = tomllib.loads(line).get(key)
        except tomllib.TOMLDecodeError:
            continue
        if value is not None:
            out.setdefault(table, {})[key] = value
    return out


def load(path: str) -> Config:
    """Read and validate the file at `path`."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(path, "(file)", e.strerror or str(e)) from None
    return loads(raw.decode("utf-8", "replace"), path)


def loads(text: str, path: str = "edgeproxy.toml") -> Config:
    """Validate TOML text; `path` is only used to name the file in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "(syntax)", str(e)) from None
    top = Reader(path, "", data)
    top.check_keys(
        (
            "node",
            "listen",
            "workers",
            "timeouts",
            "limits",
            "pool",
            "pinger",
            "cluster",
            "table",
            "trust",
            "tls",
            "backhaul",
            "overload",
            "tracing",
            "metrics",
            "log",
            "http2",
            "app",
            "instance",
            "peer",
        )
    )
    node_r = top.table("node")
    node_r.check_keys(("id", "region"))
    node = NodeConfig(id=node_r.name("id", "local"), region=node_r.name("region", "local"))

    listen_r = top.table("listen")
    listen_r.check_keys(("http", "https", "backhaul", "admin", "control", "h2c"))
    http = listen_r.addresses("http", ["127.0.0.1:8080"])
    if not http:
        raise listen_r.fail("http", "needs at least one address")
    if len(set(http)) != len(http):
        raise listen_r.fail("http", "lists an address twice")
    https = listen_r.addresses("https", [])
    if len(set(https)) != len(https):
        raise listen_r.fail("https", "lists an address twice")
    if set(https) & set(http):
        raise listen_r.fail("https", "shares an address with http")
    backhaul = listen_r.address("backhaul") if "backhaul" in listen_r.data else None
    admin = listen_r.address("admin") if "admin" in listen_r.data else None
    listen = ListenConfig(
        http=http,
        backhaul=backhaul,
        admin=admin,
        control=listen_r.text("control", default_control(node.id)),
        https=https,
        h2c=listen_r.get("h2c", bool, False),
    )

    w = top.table("workers")
    w.check_keys(("count", "drain_timeout", "quiet_period"))
    workers = WorkersConfig(
        count=w.positive("count", int, os.cpu_count() or 1),
        drain_timeout=w.positive("drain_timeout", float, 300.0),
        quiet_period=w.positive("quiet_period", float, 5.0),
    )
    if workers.count > 256:
        raise w.fail("count", f"must be <= 256, not {workers.count}")

    t = top.table("timeouts")
    names = TimeoutsConfig.__slots__
    t.check_keys(names)
    defaults = {
        "connect": 5.0,
        "backhaul_connect": 2.0,
        "upstream_response": 60.0,
        "client_header": 10.0,
        "client_idle": 60.0,
        "request": 300.0,
        "abandoned": 2.0,
        "tunnel_idle": 600.0,
        "tls_handshake": 10.0,
    }
    timeouts = TimeoutsConfig(**{n: t.positive(n, float, defaults[n]) for n in names})

    lim = top.table("limits")
    lim.check_keys(LimitsConfig.__slots__)
    limits = LimitsConfig(
        max_header_bytes=lim.positive("max_header_bytes", int, 65536),
        max_headers=lim.positive("max_headers", int, 100),
        replay_body_bytes=lim.positive("replay_body_bytes", int, 1 << 20),
        max_connections=lim.positive("max_connections", int, 8192),
        response_buffer=lim.positive("response_buffer", int, 262144),
        pipeline_depth=lim.positive("pipeline_depth", int, 16),
        pipeline_bytes=lim.positive("pipeline_bytes", int, 262144),
    )
    trust = _trust(top.table("trust"))
    tls = tls_section(top.table("tls"), https)

    p = top.table("pool")
    p.check_keys(PoolConfig.__slots__)
    pool = PoolConfig(
        max_idle=p.get("max_idle", int, 64),
        idle_timeout=p.positive("idle_timeout", float, 30.0),
    )
    if pool.max_idle < 0:
        raise p.fail("max_idle", "must be >= 0")

    pg = top.table("pinger")
    pg.check_keys(PingerConfig.__slots__)
    ping_listen = pg.address("listen", "127.0.0.1:4281")
    pinger = PingerConfig(
        listen=ping_listen,
        advertise=pg.address("advertise", str(ping_listen)),
        interval=pg.positive("interval", float, 1.0),
        down_after=pg.positive("down_after", int, 3),
        up_after=pg.positive("up_after", int, 2),
        load_publish_ms=pg.positive("load_publish_ms", int, 100),
        loss_window=pg.positive("loss_window", int, 100),
    )

    c = top.table("cluster")
    c.check_keys(ClusterConfig.__slots__)
    store = c.text("store", "none")
    if store not in STORES:
        raise c.fail("store", f"must be one of {', '.join(STORES)}, not {store!r}")
    endpoints = tuple(c.get("endpoints", list, ["http://127.0.0.1:2379"]))
    for i, url in enumerate(endpoints):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise c.fail(f"endpoints[{i}]", f"must be an http(s) URL, not {url!r}")
    cluster = ClusterConfig(
        store=store,
        endpoints=endpoints,
        ttl=c.positive("ttl", float, 10.0),
        prefix=c.text("prefix", "/edgeproxy/"),
    )
    if tls.store and store == "none":
        raise ConfigError(path, "tls.store", "needs a [cluster] store (etcd or consul)")

    tb = top.table("table")
    tb.check_keys(TableConfig.__slots__)
    table = TableConfig(
        name=tb.name("name", f"edgeproxy-{node.id}"),
        max_nodes=tb.positive("max_nodes", int, 1024),
        max_apps=tb.positive("max_apps", int, 1024),
        max_instances=tb.positive("max_instances", int, 16384),
        stale_after=tb.positive("stale_after", float, 5.0),
        writer=tb.text("writer", "master"),
        max_workers=tb.positive("max_workers", int, 64),
        max_local_instances=tb.positive("max_local_instances", int, 256),
    )
    if table.writer not in ("master", "pinger"):
        raise tb.fail("writer", f"must be master or pinger, not {table.writer!r}")
    if table.max_workers < 2 * workers.count:
        raise tb.fail(
            "max_workers", f"must be >= 2 x workers.count ({2 * workers.count}): reloads overlap"
        )

    apps = _apps(top)
    peers = _peers(top, node)
    instances = _instances(top, node, apps, peers)
    if len(apps) > table.max_apps:
        raise tb.fail("max_apps", f"{len(apps)} apps configured, more than {table.max_apps}")
    if len(instances) > table.max_instances:
        raise tb.fail("max_instances", f"{len(instances)} instances, more than the table holds")
    local = sum(1 for i in instances if i.node == node.id)
    if local > table.max_local_instances:
        raise tb.fail(
            "max_local_instances", f"{local} local instances, more than {table.max_local_instances}"
        )
    hosts = {h: a.name for a in apps for h in a.hosts}
    backhaul_tls = backhaul_section(top.table("backhaul"), listen.backhaul)
    return Config(
        path=path,
        node=node,
        listen=listen,
        workers=workers,
        timeouts=timeouts,
        limits=limits,
        pool=pool,
        pinger=pinger,
        cluster=cluster,
        table=table,
        apps=apps,
        instances=instances,
        peers=peers,
        hosts=hosts,
        trust=trust,
        tls=tls,
        backhaul=backhaul_tls,
        overload=overload_section(top.table("overload")),
        tracing=tracing_section(top.table("tracing")),
        metrics=metrics_section(top.table("metrics")),
        log=log_section(top.table("log")),
        http2=http2_section(top.table("http2")),
    )


def _trust(r: Reader) -> TrustConfig:
    r.check_keys(("forwarded_from", "upgrade"))
    nets = []
    for i, raw in enumerate(r.get("forwarded_from", list, [])):
        try:
            nets.append(ipaddress.ip_network(raw, strict=False))
        except (TypeError, ValueError):
            raise r.fail(f"forwarded_from[{i}]", f"{raw!r} is not an address or CIDR") from None
    protos = []
    for i, raw in enumerate(r.get("upgrade", list, ["websocket"])):
        if not isinstance(raw, str) or not _TOKEN_RE.match(raw):
            raise r.fail(f"upgrade[{i}]", f"{raw!r} is not a protocol token")
        if raw.lower().startswith("h2c"):
            raise r.fail(f"upgrade[{i}]", "h2c is never tunnelled (HTTP/2 is the proxy's own)")
        protos.append(raw.lower())
    return TrustConfig(forwarded_from=tuple(nets), upgrade=frozenset(protos))


def _unique(items: list[T], key: Callable[[T], str], what: str, path: str, prefix: str) -> None:
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        k = key(item)
        if k in seen:
            problem = f"{what} {k!r} already used by {prefix}[{seen[k]}]"
            raise ConfigError(path, f"{prefix}[{i}]", problem)
        seen[k] = i


def _apps(top: Reader) -> tuple[AppConfig, ...]:
    apps: list[AppConfig] = []
    owner: dict[str, str] = {}
    for r in top.tables("app"):
        r.check_keys(AppConfig.__slots__)
        name = r.name("name")
        hosts = []
        for j, raw in enumerate(r.get("hosts", list)):
            if not isinstance(raw, str) or not HOST_RE.match(raw.lower()):
                raise r.fail(
                    f"hosts[{j}]",
                    f"{raw!r} is not a valid host name (a wildcard is *. and 2+ labels)",
                )
            h = raw.lower()
            if h in owner:
                raise r.fail(f"hosts[{j}]", f"{h!r} already belongs to app {owner[h]!r}")
            owner[h] = name
            hosts.append(h)
        if not hosts:
            raise r.fail("hosts", "needs at least one host name")
        strategy = r.text("strategy", "closest")
        if strategy not in STRATEGIES:
            raise r.fail("strategy", f"must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
        soft = r.positive("soft_limit", int, 20)
        hard = r.positive("hard_limit", int, max(soft, 25))
        if hard < soft:
            raise r.fail("hard_limit", f"must be >= soft_limit ({soft})")
        apps.append(
            AppConfig(
                name=name,
                hosts=tuple(hosts),
                strategy=strategy,
                soft_limit=soft,
                hard_limit=hard,
                sample_k=r.positive("sample_k", int, 2),
            )
        )
    _unique(apps, lambda a: a.name, "name", top.path, "app")
    return tuple(apps)


def _peers(top: Reader, node: NodeConfig) -> tuple[PeerConfig, ...]:
    peers: list[PeerConfig] = []
    for r in top.tables("peer"):
        r.check_keys(PeerConfig.__slots__)
        pid = r.name("id")
        if pid == node.id:
            raise r.fail("id", f"{pid!r} is this node's own id")
        rtt = r.get("rtt_ms", float) if "rtt_ms" in r.data else None
        if rtt is not None and rtt < 0:
            raise r.fail("rtt_ms", "must be >= 0")
        peers.append(
            PeerConfig(
                id=pid,
                region=r.name("region", "unknown"),
                backhaul=r.address("backhaul"),
                ping=r.address("ping"),
                rtt_ms=rtt,
            )
        )
    _unique(peers, lambda p: p.id, "id", top.path, "peer")
    return tuple(peers)


def _instances(
    top: Reader, node: NodeConfig, apps: tuple[AppConfig, ...], peers: tuple[PeerConfig, ...]
) -> tuple[InstanceConfig, ...]:
    app_names = {a.name for a in apps}
    nodes = {node.id} | {p.id for p in peers}
    out: list[InstanceConfig] = []
    for r in top.tables("instance"):
        r.check_keys(("app", "id", "address", "node"))
        app = r.name("app")
        if app not in app_names:
            raise r.fail("app", f"no [[app]] is named {app!r}")
        where = r.name("node", node.id)
        if where not in nodes:
            raise r.fail("node", f"{where!r} is neither this node nor a [[peer]]")
        iid = r.name("id")
        out.append(InstanceConfig(app=app, id=iid, address=r.address("address"), node=where))
    _unique(out, lambda i: i.id, "id", top.path, "instance")
    return tuple(out)
