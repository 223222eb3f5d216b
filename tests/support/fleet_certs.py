"""The backhaul credentials of a test fleet: one fleet CA per fleet, a certificate per node.

Made with the same code as `edgeproxy ca init` / `edgeproxy ca issue` (proxy.fleetca),
in the fleet's work folder; `backhaul_keys` gives a node's [backhaul] section.
"""

from __future__ import annotations

from pathlib import Path

from proxy.fleetca import init_ca, issue


class FleetCerts:
    """A fleet CA in `workdir`/ca and node credentials in `workdir`/certs."""

    def __init__(self, workdir: Path) -> None:
        self.ca_dir = workdir / "ca"
        self.out = workdir / "certs"
        init_ca(str(self.ca_dir))
        self.issued: dict[str, dict[str, str]] = {}

    def backhaul_keys(self, node_id: str) -> dict[str, str]:
        """ca, cert and key of `node_id` (issued on first use)."""
        if node_id not in self.issued:
            w = issue(node_id, str(self.ca_dir), str(self.out))
            self.issued[node_id] = {"ca": w.ca, "cert": w.cert, "key": w.key}
        return self.issued[node_id]

    def section(self, node_id: str) -> str:
        """`node_id`'s [backhaul] section (TOML)."""
        keys = self.backhaul_keys(node_id)
        return "[backhaul]\n" + "".join(f'{k} = "{v}"\n' for k, v in keys.items()) + "\n"
