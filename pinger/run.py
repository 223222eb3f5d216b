"""The pinger's entry point (`python -m pinger`, `edgeproxy pinger`): load the config,
open the table as its single writer, pick this life's boot epoch and run the daemon
(pinger.daemon) on uvloop in the foreground, with its READY line on stdout."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Sequence

from pinger.daemon import Daemon, log
from proxy.config import ConfigError
from proxy.config import load as load_config
from proxy.config_table import table_layout, table_name
from shm.errors import ShmError, WriterBusyError
from shm.writer import TableWriter


def _print_ready(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def new_epoch(writer: TableWriter) -> int:
    """This life's boot epoch: wall milliseconds, above anything the table held before."""
    before = max((r.boot_epoch for r in writer.nodes().values()), default=0)
    return max(int(time.time() * 1000), before + 1)


def main(config_path: str, loss_window: int | None = None) -> int:
    """`edgeproxy pinger -c FILE`: run the pinger in the foreground; the exit status.

    The loss window is `[pinger] loss_window`; `loss_window` (the --loss-window flag)
    overrides it.
    """
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s pinger %(levelname)s %(message)s"
    )
    try:
        config = load_config(config_path)
    except ConfigError as e:
        print(f"edgeproxy pinger: {e}", file=sys.stderr)
        return 2
    if config.table.writer != "pinger":
        log.warning("[table] writer = %r: the master also writes this table", config.table.writer)
    try:
        writer = TableWriter.open(table_layout(config.table), table_name(config.table))
    except WriterBusyError as e:
        print(f"edgeproxy pinger: {e}; is another pinger running?", file=sys.stderr)
        return 1
    except (ShmError, OSError) as e:
        print(f"edgeproxy pinger: table {config.table.name!r}: {e}", file=sys.stderr)
        return 1
    try:
        window = config.pinger.loss_window if loss_window is None else loss_window
        daemon = Daemon(config, writer, epoch=new_epoch(writer), loss_window=window)
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(daemon.run(_print_ready))
    finally:
        writer.close()


def cli(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pinger", description="the edgeproxy pinger")
    ap.add_argument("-c", "--config", required=True, help="node config (TOML)")
    ap.add_argument(
        "--loss-window",
        type=int,
        default=None,
        help="probes the loss share covers (overrides [pinger] loss_window)",
    )
    args = ap.parse_args(argv)
    return main(args.config, args.loss_window)
