"""Bring a table writer's rows to a wanted set of nodes, apps and instances.

Owns applying a wanted set with the fewest writes, under one generation bump. The
rows are the caller's. It must not read clocks or sockets: hot data (load, RTT) is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from shm.codec import AppRow, InstanceRow, NodeRow
from shm.writer import TableWriter


@dataclass(frozen=True, slots=True)
class Wanted:
    nodes: tuple[NodeRow, ...]
    apps: tuple[AppRow, ...]
    instances: tuple[InstanceRow, ...]


def reconcile(w: TableWriter, wanted: Wanted) -> int:
    """Make the table hold exactly `wanted`; returns the number of rows changed."""
    changed = 0
    with w.batch():
        have_i = w.instances()
        want_i = {r.id: r for r in wanted.instances}
        for iid in [i for i in have_i if i not in want_i]:
            w.remove_instance(iid)
            changed += 1
        have_a = w.apps()
        want_a = {r.name: r for r in wanted.apps}
        for name in [a for a in have_a if a not in want_a]:
            w.remove_app(name)
            changed += 1
        have_n = w.nodes()
        want_n = {r.id: r for r in wanted.nodes}
        for nid in [n for n in have_n if n not in want_n]:
            w.remove_node(nid)
            changed += 1
        changed += _put(w.put_node, have_n, want_n.values(), lambda r: r.id)
        changed += _put(w.put_app, have_a, want_a.values(), lambda r: r.name)
        changed += _put(w.put_instance, have_i, want_i.values(), lambda r: r.id)
    return changed


R = TypeVar("R", NodeRow, AppRow, InstanceRow)


def _put(
    put: Callable[[R], None], have: Mapping[str, R], rows: Iterable[R], key: Callable[[R], str]
) -> int:
    n = 0
    for r in rows:
        if have.get(key(r)) != r:
            put(r)
            n += 1
    return n
