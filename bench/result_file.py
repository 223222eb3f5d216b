"""Where a bench script's report goes: `bench/results/<stem>-<UTC yyyymmdd-hhmm>.md`
unless the command named a file; the text is printed as well, then the path."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def path_for(stem: str, when: dt.datetime | None = None) -> Path:
    """bench/results/<stem>-<yyyymmdd-hhmm>.md for `when` (now, UTC, by default)."""
    when = when or dt.datetime.now(dt.UTC)
    return RESULTS / f"{stem}-{when:%Y%m%d-%H%M}.md"


def write(text: str, out: Path) -> Path:
    """Write the report to `out` (its folder made if need be), print it and where it went."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written to {out}")
    return out
