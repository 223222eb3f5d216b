"""The cluster store's records: what each key holds, encoding, and the view built from them.

Key layout under `cluster.prefix` (values are orjson records, each with the publisher's
boot epoch): `nodes/{id}`, `instances/{node}/{id}`, `load/{node}/{instance}`; every key is
held by the node's etcd lease or Consul session (Consul keys drop the leading "/").
No I/O here: backends list and watch, this module decodes and keeps the newest epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

log = logging.getLogger("edgeproxy.store")


@dataclass(frozen=True, slots=True)
class NodeRecord:
    id: str
    region: str
    ping: str
    backhaul: str
    boot_epoch: int


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    app: str
    id: str
    node: str
    address: str
    soft_limit: int
    hard_limit: int
    boot_epoch: int


@dataclass(frozen=True, slots=True)
class LoadRecord:
    instance: str
    node: str
    load: int
    time: float
    boot_epoch: int


@dataclass(frozen=True, slots=True)
class ClusterView:
    nodes: Mapping[str, NodeRecord]
    instances: Mapping[str, InstanceRecord]
    loads: Mapping[str, LoadRecord]


Record = NodeRecord | InstanceRecord | LoadRecord
_KINDS: dict[str, tuple[type[Any], int]] = {
    "nodes": (NodeRecord, 1),
    "instances": (InstanceRecord, 2),
    "load": (LoadRecord, 2),
}
_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
}


def record_key(rec: Record) -> str:
    """The key of a record, relative to the prefix."""
    if isinstance(rec, NodeRecord):
        return f"nodes/{rec.id}"
    if isinstance(rec, InstanceRecord):
        return f"instances/{rec.node}/{rec.id}"
    return f"load/{rec.node}/{rec.instance}"


def encode(rec: Record) -> bytes:
    return orjson.dumps(rec)


def decode(rel_key: str, value: bytes) -> Record | None:
    """The record stored under `rel_key`, or None (logged) when it is not one of ours."""
    kind, _, rest = rel_key.partition("/")
    spec = _KINDS.get(kind)
    if spec is None or len(rest.split("/")) != spec[1]:
        return None
    cls, _ = spec
    try:
        data = orjson.loads(value)
        if not isinstance(data, dict) or set(data) != set(cls.__slots__):
            raise ValueError("wrong fields")
        for name, ftype in cls.__annotations__.items():
            v = data[name]
            if isinstance(v, bool) or not isinstance(v, _TYPES[ftype]):
                raise ValueError(f"{name}: {v!r}")
        rec: Record = cls(**data)
    except (orjson.JSONDecodeError, ValueError) as e:
        log.warning("store: ignoring malformed record %s: %s", rel_key, e)
        return None
    if record_key(rec) != rel_key:
        log.warning("store: ignoring record %s that names another key", rel_key)
        return None
    return rec


@dataclass(slots=True)
class Records:
    """The raw records under the prefix, as last listed and watched."""

    prefix: str
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    instances: dict[str, InstanceRecord] = field(default_factory=dict)
    loads: dict[str, LoadRecord] = field(default_factory=dict)

    def clear(self) -> None:
        self.nodes.clear()
        self.instances.clear()
        self.loads.clear()

    def put(self, key: str, value: bytes) -> bool:
        if not key.startswith(self.prefix):
            return False
        rel = key[len(self.prefix) :]
        rec = decode(rel, value)
        if rec is None:
            return self.delete(key)
        if isinstance(rec, NodeRecord):
            self.nodes[rel] = rec
        elif isinstance(rec, InstanceRecord):
            self.instances[rel] = rec
        else:
            self.loads[rel] = rec
        return True

    def delete(self, key: str) -> bool:
        rel = key[len(self.prefix) :]
        found = False
        for d in (self.nodes, self.instances, self.loads):
            found = d.pop(rel, None) is not None or found
        return found

    def view(self) -> ClusterView:
        """Only each node's newest epoch, and only nodes that have a node record."""
        epoch = {n.id: n.boot_epoch for n in self.nodes.values()}
        others: list[InstanceRecord | LoadRecord] = [*self.instances.values(), *self.loads.values()]
        for r in others:
            if r.node in epoch and r.boot_epoch > epoch[r.node]:
                epoch[r.node] = r.boot_epoch
        nodes = {n.id: n for n in self.nodes.values() if n.boot_epoch == epoch[n.id]}
        inst = {
            i.id: i
            for _, i in sorted(self.instances.items())
            if i.node in nodes and i.boot_epoch == epoch[i.node]
        }
        loads = {
            x.instance: x
            for _, x in sorted(self.loads.items())
            if x.node in nodes and x.boot_epoch == epoch[x.node]
        }
        return ClusterView(nodes=nodes, instances=inst, loads=loads)
