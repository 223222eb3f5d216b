"""The `edgeproxy` command: one program, a subcommand per job.

Owns argument parsing and how results are printed and which exit status they
give. It must not hold logic of its own: each subcommand calls its module.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from proxy import __version__, build
from proxy.config import ConfigError, control_path, load

DEFAULT_CONFIG = os.environ.get("EDGEPROXY_CONFIG", "/etc/edgeproxy/edgeproxy.toml")


def _control_path(config_path: str) -> str:
    return control_path(config_path)


def cmd_run(args: argparse.Namespace) -> int:
    from proxy.master.master import run

    return run(args.config, args.takeover)


def cmd_status(args: argparse.Namespace) -> int:
    from proxy.master.control import call

    try:
        out = call(_control_path(args.config), "status", timeout=10)
    except OSError as e:
        print(f"edgeproxy: no master answers for {args.config}: {e}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    m = out["master"]
    print(
        f"master pid {m['pid']}  generation {m['generation']}  version {m['version']}"
        f"  ({m['build']})"
    )
    cols = ("pid", "slot", "gen", "state", "conns", "inflight", "requests")
    print("{:>8} {:>4} {:>4} {:<9} {:>6} {:>8} {:>9}".format(*cols))
    for w in out["workers"]:
        print(
            f"{w['pid']:>8} {w['slot']:>4} {w['generation']:>4} {w['state']:<9} "
            f"{w.get('open_connections', '-'):>6} {w.get('inflight', '-'):>8} "
            f"{w.get('requests', '-'):>9}"
        )
    for lst in out["listeners"]:
        print(f"listener {lst['kind']} {lst['address']} slot {lst['slot']}")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    from proxy.master.control import call

    path = _control_path(args.config)
    try:
        master = call(path, "status", timeout=10)["master"]
    except (OSError, KeyError, TypeError) as e:
        print(f"edgeproxy: no master answers for {args.config}: {e}", file=sys.stderr)
        return 1
    # The master re-reads the file it was started with: checking another one (a copy, a
    # staging file) would vouch for a config that is not the one about to be loaded.
    theirs = master.get("config_realpath") or os.path.realpath(str(master.get("config")))
    if os.path.realpath(args.config) != theirs:
        print(
            f"edgeproxy: reload refused: the master (pid {master.get('pid')}) runs {theirs}, "
            f"not {os.path.realpath(args.config)}; it reloads only its own file",
            file=sys.stderr,
        )
        return 1
    try:
        load(args.config)
    except ConfigError as e:
        print(f"edgeproxy: reload refused: {e}", file=sys.stderr)
        return 2
    try:
        out: dict[str, Any] = call(path, "reload", timeout=args.timeout)
    except OSError as e:
        print(f"edgeproxy: no master answers for {args.config}: {e}", file=sys.stderr)
        return 1
    if out.get("ok"):
        print(f"reloaded {theirs}: generation {out['generation']} serves")
        return 0
    print(f"edgeproxy: reload refused: {out.get('error')}", file=sys.stderr)
    return 1


def cmd_pinger(args: argparse.Namespace) -> int:
    from pinger.run import main as pinger_main

    return pinger_main(args.config)


def _trust_the_masters_segments(config_path: str) -> None:
    """The table belongs to the running master's user (the service user, when root runs
    this): trust that owner, learnt from the master itself over its control socket."""
    from proxy.master.control import call
    from shm.segment import trust_owner

    try:
        status = call(_control_path(config_path), "status", timeout=10)
        trust_owner(os.stat(f"/proc/{int(status['master']['pid'])}").st_uid)
    except (OSError, KeyError, TypeError, ValueError):
        pass  # no master answers: only our own (or root's) segments are read


def cmd_table(args: argparse.Namespace) -> int:
    import time

    from proxy.config_table import inflight_name, table_layout, table_name
    from shm.dump import table_dump
    from shm.errors import ShmError
    from shm.inflight import InflightSegment
    from shm.reader import TableReader

    try:
        config = load(args.config)
        table, node = config.table, config.node.id
    except ConfigError as e:  # mid-edit: read the table the running master uses
        from proxy.config import TableConfig
        from proxy.master.control import call

        try:
            status = call(_control_path(args.config), "status", timeout=10)
            table, node = TableConfig(**status["table"]), str(status["node"])
        except (OSError, KeyError, TypeError) as e2:
            print(f"{e}\nedgeproxy: and no master answers to say its table: {e2}", file=sys.stderr)
            return 2
        print(f"edgeproxy: {e}; showing the running master's table", file=sys.stderr)
    _trust_the_masters_segments(args.config)
    try:
        reader = TableReader.attach(table_layout(table), table_name(table))
    except (ShmError, OSError) as e:
        print(f"edgeproxy: table {table.name!r}: {e}", file=sys.stderr)
        return 1
    try:
        inflight: InflightSegment | None = InflightSegment.attach(inflight_name(table))
    except (ShmError, OSError):
        inflight = None
    reader.local_node = node
    try:
        out = table_dump(reader, time.time(), table.stale_after, inflight)
    finally:
        reader.close()
        if inflight is not None:
            inflight.close()
    if args.json:
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    w = out["writer"]
    state = "STALE" if out["stale"] else "fresh"
    print(
        f"table {out['segment']}  generation {out['generation']}  writer pid {w['pid']} "
        f"epoch {w['boot_epoch']}  {state} (heartbeat age {out['heartbeat_age']} s)"
    )
    store = out["store"]
    if store["state"] != "none":
        print(f"cluster store: {store['state']} (for {store['age']} s)")
    print("nodes:")
    for n in out["nodes"]:
        print(
            f"  {n['id']:<16} {n['region']:<8} {'up' if n['up'] else 'DOWN':<4} "
            f"rtt {n['rtt_ms']} ms  jitter {n['jitter_ms']} ms  loss {n['loss']:.1%}  "
            f"age {n['age']} s"
        )
    print("instances:")
    for i in out["instances"]:
        inflight_s = f"  inflight {i['inflight']}" if "inflight" in i else ""
        print(
            f"  {i['app']:<12} {i['id']:<16} node {i['node']:<10} "
            f"load {i['load']}/{i['soft_limit']}/{i['hard_limit']}  age {i['age']} s{inflight_s}"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo.cluster import run_demo

    return run_demo(args.port, args.https_port, args.admin_port, args.instances, args.workers)


def cmd_ca(args: argparse.Namespace) -> int:
    from proxy.fleetca import FleetCAError, init_ca, issue

    try:
        if args.ca_command == "init":
            w = init_ca(args.out, args.days)
            print(f"fleet CA written: {w.cert} (certificate), {w.key} (key: keep it off the nodes)")
            print(f"next: edgeproxy ca issue NODE_ID --ca {args.out} --out DIR, for each node")
            return 0
        w = issue(args.node_id, args.ca, args.out, args.days)
    except FleetCAError as e:
        print(f"edgeproxy ca {args.ca_command}: {e}", file=sys.stderr)
        return 1
    for note in w.notes:
        print(f"edgeproxy ca issue: note: {note}", file=sys.stderr)
    print(f"# node {args.node_id!r}: {w.cert}, {w.key}; the fleet CA: {w.ca}")
    print("# in that node's config (then `edgeproxy reload` if it runs):")
    print("[backhaul]")
    for k, v in (("ca", w.ca), ("cert", w.cert), ("key", w.key)):
        print(f"{k} = {orjson.dumps(os.path.abspath(v)).decode()}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgeproxy",
        description="A global edge HTTP proxy: the closest, least loaded instance, no queues.",
    )
    p.add_argument("--version", action="version", version=f"edgeproxy {__version__} ({build()})")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="TOML config file")
        return sp

    sp = add("run", "run the master and its workers in the foreground")
    sp.add_argument(
        "--takeover",
        metavar="SOCKET",
        help="take the listening sockets over from the master at this control socket",
    )
    sp.set_defaults(func=cmd_run)
    sp = add("status", "show the master, its workers and listeners")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_status)
    sp = add("reload", "reload the running master; waits for the new generation")
    sp.add_argument("--timeout", type=float, default=120.0, help="seconds to wait")
    sp.set_defaults(func=cmd_reload)
    add("pinger", "run the pinger daemon (the table's writer) in the foreground").set_defaults(
        func=cmd_pinger
    )
    sp = add("table", "the shared-memory table as the workers see it")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_table)
    sp = sub.add_parser(
        "ca",
        help="the fleet CA: node certificates for the backhaul's mutual TLS",
        description="The fleet CA (ECDSA P-256) and node certificates (SAN URI "
        "spiffe://edgeproxy/node/<id>, serverAuth + clientAuth), files mode 0600.",
    )
    ca = sp.add_subparsers(dest="ca_command", required=True)
    ci = ca.add_parser("init", help="a new fleet CA: DIR/ca.pem and DIR/ca.key")
    ci.add_argument("--out", required=True, metavar="DIR", help="folder to write the CA to")
    ci.add_argument("--days", type=int, default=3650, help="validity (default 3650)")
    ci.set_defaults(func=cmd_ca)
    cs = ca.add_parser(
        "issue", help="a node's key and certificate: DIR/<id>.key, DIR/<id>.pem (+ DIR/ca.pem)"
    )
    cs.add_argument("node_id", metavar="NODE_ID", help="the node's [node] id")
    cs.add_argument("--ca", required=True, metavar="DIR", help="folder of ca.pem and ca.key")
    cs.add_argument("--out", required=True, metavar="DIR", help="folder to write to")
    cs.add_argument("--days", type=int, default=365, help="validity (default 365)")
    cs.set_defaults(func=cmd_ca)
    sp = sub.add_parser("demo", help="a working single-node setup: proxy + demo instances")
    sp.add_argument("--port", type=int, default=8080, help="proxy port on 127.0.0.1")
    sp.add_argument("--https-port", type=int, default=8443, help="HTTPS port on 127.0.0.1")
    sp.add_argument("--admin-port", type=int, default=9901, help="admin port on 127.0.0.1")
    sp.add_argument("--instances", type=int, default=3, help="demo instances to start")
    sp.add_argument("--workers", type=int, default=None, help="workers (default: cores)")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
