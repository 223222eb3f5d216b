"""The markdown report of one or more fleet runs: every figure against its goal."""

from __future__ import annotations

import json
import os
import platform
from typing import Any

GOAL_JOIN_S = 2.0
GOAL_WRITES = 1.0
GOAL_PING_BPS = 100_000
GOAL_CPU = 0.02


def _worst(times: dict[str, float | None] | None) -> float | None:
    """The slowest real node's time, or None if any never saw it."""
    if not times:
        return None
    vals = list(times.values())
    return None if any(v is None for v in vals) else max(v for v in vals if v is not None)


def _ok(good: bool | None) -> str:
    return "n/a" if good is None else ("met" if good else "**missed**")


def checks(r: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(figure, measured, goal, met) rows of one run."""
    ttl = r["options"]["ttl"]
    rows: list[tuple[str, str, str, bool | None]] = []
    j = _worst(r.get("join_seen_s"))
    rows.append(
        (
            "join seen by every real table (s)",
            str(j),
            f"<= {GOAL_JOIN_S}",
            None if j is None else j <= GOAL_JOIN_S,
        )
    )
    rows.append(
        (
            "join: lease + records written (s) / put seen on a watch (s)",
            f"{r.get('join_register_s')} / {r.get('join_watch_event_s')}",
            "-",
            None,
        )
    )
    ju = _worst(r.get("join_up_s"))
    rows.append(("join marked up (answering) by every real table (s)", str(ju), "-", None))
    k = _worst(r.get("kill_sim_gone_s"))
    rows.append(
        (
            f"simulated node killed: row gone everywhere (s, TTL {ttl:g})",
            str(k),
            f"<= {ttl + 1:g}",
            None if k is None else k <= ttl + 1,
        )
    )
    rows.append(
        (
            "kill: last keep-alive before the kill (s) / delete seen on a watch (s)",
            f"{r.get('kill_since_keepalive_s')} / {r.get('kill_watch_event_s')}",
            "-",
            None,
        )
    )
    kd = _worst(r.get("kill_sim_down_s"))
    rows.append(("simulated node killed: marked down by the mesh (s)", str(kd), "-", None))
    if "kill_real_gone_s" in r:
        kr = _worst(r["kill_real_gone_s"])
        rows.append(
            (
                "real node kill -9: row gone in the other real tables (s)",
                str(kr),
                f"<= {ttl + 1:g}",
                None if kr is None else kr <= ttl + 1,
            )
        )
    s = r.get("steady")
    if s:
        w = s["writes_per_node_s"]
        worst = max([w["sim_max"], *w["real"].values()])
        rows.append(
            (
                "store writes per node per s (mean / worst node)",
                f"{w['all_nodes_mean']} / {worst}",
                f"<= {GOAL_WRITES}",
                worst <= GOAL_WRITES,
            )
        )
        rows.append(
            (
                "etcd revisions per node per s (etcd's own count)",
                str(s["revisions_per_node_s"]),
                f"<= {GOAL_WRITES}",
                s["revisions_per_node_s"] <= GOAL_WRITES,
            )
        )
        rows.append(
            ("watch events delivered per node per s", str(s["watch_events_per_node_s"]), "-", None)
        )
        rows.append(
            ("lease keep-alives per node per s", str(s["keepalives_per_node_s"]), "-", None)
        )
        for rid, x in s["real"].items():
            rows.append(
                (
                    f"{rid}: ping traffic, bytes/s on the wire (payload)",
                    f"{x['ping_wire_Bps']} ({x['ping_payload_Bps']})",
                    f"<= {GOAL_PING_BPS}",
                    x["ping_wire_Bps"] <= GOAL_PING_BPS,
                )
            )
            rows.append(
                (
                    f"{rid}: pinger CPU, share of one core",
                    f"{x['cpu_share']:.2%}",
                    f"<= {GOAL_CPU:.0%}",
                    x["cpu_share"] <= GOAL_CPU,
                )
            )
        e = s["etcd"]
        rows.append(
            (
                "etcd CPU, share of one core per member",
                ", ".join(f"{c:.1%}" for c in e["cpu_share"]),
                "-",
                None,
            )
        )
        rows.append(("etcd RSS per member (MiB)", ", ".join(map(str, e["rss_mb"])), "-", None))
        rows.append(
            ("etcd db size / in use (MiB)", f"{e['db_size_mb']} / {e['db_in_use_mb']}", "-", None)
        )
        t = r.get("sim_totals", {})
        rows.append(
            (
                "simulated nodes: store errors / watch failures (whole run)",
                f"{t.get('store_errors')} / {t.get('watch_failures')}",
                "-",
                None,
            )
        )
        lag = r.get("lag", {})
        rows.append(
            (
                "bench event loop lag p50 / max (ms)",
                f"{lag.get('p50_ms', 0):.1f} / {lag.get('max_ms', 0):.0f}",
                "-",
                None,
            )
        )
        rows.append(
            (
                "bench process CPU (simulated nodes + observer)",
                f"{s['bench_cpu_share']:.0%}",
                "-",
                None,
            )
        )
    return rows


def markdown(runs: list[dict[str, Any]], command: str, date: str, load: tuple[str, str]) -> str:
    out = [
        f"# Fleet simulation, {date}",
        "",
        f"- command: `{command}`",
        f"- machine: {platform.node()}, `nproc` = {os.cpu_count()}, "
        f"load average before / after: {load[0]} / {load[1]} (shared with other agents and "
        "a test suite: timings are noisy)",
        f"- python {platform.python_version()}, etcd from /usr/bin/etcd",
        "",
    ]
    for r in runs:
        o = r["options"]
        out += [
            f"## {o['nodes']} nodes ({o['real']} real), etcd {r.get('etcd_members', '?')} "
            f"member(s), TTL {o['ttl']:g} s, ping interval {o['interval']:g} s",
            "",
        ]
        if "error" in r:
            out += [f"**Run failed: {r['error']}**", ""]
        out += ["| figure | measured | goal | |", "|---|---|---|---|"]
        for name, got, goal, met in checks(r):
            out.append(f"| {name} | {got} | {goal} | {_ok(met) if goal != '-' else ''} |")
        out += ["", "<details><summary>raw figures</summary>", "", "```json"]
        out += [json.dumps(r, indent=1, default=str), "```", "", "</details>", ""]
    return "\n".join(out)
