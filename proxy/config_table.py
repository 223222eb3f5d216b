"""The table a config declares: its segment names, its layout and its rows.

Owns the translation from `proxy.config` records to the plain values `shm` takes
(a Layout, a segment name, table rows), for the master, the workers, the CLI and
the pinger alike. It must not open a segment or read a clock.
"""

from __future__ import annotations

from proxy.config import Config, TableConfig
from shm.codec import AppRow, InstanceRow, NodeRow
from shm.inflight_codec import inflight_segment_name
from shm.layout import Layout, table_segment_name
from shm.sync import Wanted


def table_layout(table: TableConfig) -> Layout:
    """The segment layout of `[table]`'s capacities."""
    return Layout(table.max_nodes, table.max_apps, table.max_instances)


def table_name(table: TableConfig) -> str:
    """The POSIX shm name of the table segment."""
    return table_segment_name(table.name)


def inflight_name(table: TableConfig) -> str:
    """The POSIX shm name of the in-flight counters segment."""
    return inflight_segment_name(table.name)


def app_rows(config: Config) -> tuple[AppRow, ...]:
    return tuple(
        AppRow(a.name, a.hosts, a.strategy, a.soft_limit, a.hard_limit, a.sample_k)
        for a in config.apps
    )


def instance_rows(config: Config, local_only: bool = False) -> tuple[InstanceRow, ...]:
    limits = {a.name: (a.soft_limit, a.hard_limit) for a in config.apps}
    out = []
    for i in config.instances:
        if local_only and i.node != config.node.id:
            continue
        soft, hard = limits[i.app]
        out.append(InstanceRow(i.app, i.id, i.node, str(i.address), soft, hard))
    return tuple(out)


def self_row(config: Config, boot_epoch: int) -> NodeRow:
    backhaul = str(config.listen.backhaul) if config.listen.backhaul else ""
    return NodeRow(config.node.id, config.node.region, backhaul, boot_epoch)


def static_rows(config: Config, boot_epoch: int) -> Wanted:
    """Everything a config declares: this node, its static peers, apps, instances."""
    nodes = [self_row(config, boot_epoch)]
    nodes += [NodeRow(p.id, p.region, str(p.backhaul), 0) for p in config.peers]
    return Wanted(tuple(nodes), app_rows(config), instance_rows(config))
