"""The master's record of one worker process: slot, generation, pid, stats block, state.

A record shared by the master loop and its views (status, metrics); no behaviour.
"""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import dataclass, field

from proxy.telemetry.statsblock import StatsBlock


@dataclass(eq=False)
class WorkerProc:
    slot: int
    generation: int
    pid: int
    block: StatsBlock
    cell: int
    started: float
    state: str = "starting"  # starting | serving | draining
    # Kept so that subprocess never reaps the worker behind the master's back (a
    # dropped Popen is reaped by the next Popen); None for adopted workers.
    popen: subprocess.Popen[bytes] | None = None
    ready: asyncio.Future[bool] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
