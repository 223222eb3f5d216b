"""A fleet of many nodes simulated in one process, beside a few real pingers and real etcd.

`sim` hosts the simulated nodes (real ping codec over UDP, real etcd leases and records);
`realnode` runs the real pingers and reads their tables; `etcdstats` reads etcd's own
figures; `run` puts a scenario together; `report` writes the markdown.
Entry point: `python -m bench.fleet_sim`.
"""
