"""The cluster store the pinger publishes to and follows: picks the configured backend.

Backends (etcd, consul) share pinger.store.base; records, the HTTP client and the
backoff are modules of their own. Only this module chooses among backends.
"""

from __future__ import annotations

from pinger.store.base import Store
from proxy.config import Config


def open_store(config: Config) -> Store | None:
    """The configured backend (not started yet), or None for store = "none"."""
    kind = config.cluster.store
    if kind == "etcd":
        from pinger.store.etcd import EtcdStore

        return EtcdStore(config.cluster)
    if kind == "consul":
        from pinger.store.consul import ConsulStore

        return ConsulStore(config.cluster)
    return None
