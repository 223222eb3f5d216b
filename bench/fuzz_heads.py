"""The head fuzzer at volume: tests/unit/test_fuzz_heads.py's generators and checks on N inputs.

    python -m bench.fuzz_heads --count 1000000 [--seed S] [--max-seconds 1500]

Input i is generated from random.Random((S << 32) | i), so any input is reproduced from
(seed, index) alone, and the run is the same on every machine. The choices are drawn from
a seeded random.Random rather than by hypothesis: the generators are the same code
(tests/support/hostile_heads.py, written against a Chooser), but hypothesis' engine costs more per
example than the checks and keeps every example's choices to avoid repeats, which grows
without bound at 10^6. atheris would add coverage feedback, but only from Python code:
llhttp, where the framing decisions are made, is C built without its instrumentation, and
the structured generator already aims at the fields that matter.

Prints inputs/s, what became of the inputs (forwarded, refused by the proxy by status,
refused by the parser, head never complete), the same for upstream responses, and every
violated invariant with its shortest input; writes it all to
bench/results/fuzz-heads-<date>.txt with the machine and the command.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

from tests.support.head_check import KNOWN, Violation, check_request_bytes, check_response_bytes
from tests.support.hostile_heads import RandomChooser, request, response

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class Tally:
    """Counts and the shortest input per violated invariant."""

    def __init__(self) -> None:
        self.fates: collections.Counter[str] = collections.Counter()
        self.violations: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, tuple[int, bytes, str]] = {}

    def violated(self, index: int, data: bytes, vs: list[Violation], side: str) -> None:
        for v in vs:
            key = f"{side} {v.invariant}"
            self.violations[key] += 1
            old = self.examples.get(key)
            if old is None or len(data) < len(old[1]):
                self.examples[key] = (index, data, v.detail)


def run(count: int, seed: int, max_seconds: float, progress: int) -> tuple[Tally, int, float]:
    t = Tally()
    start = time.monotonic()
    done = 0
    for i in range(count):
        if time.monotonic() - start > max_seconds:
            break
        rng = random.Random((seed << 32) | i)
        c = RandomChooser(rng)
        data = request(c)
        cut = rng.randint(1, max(1, len(data) - 1))
        out, vs = check_request_bytes(data, cut)
        if out.messages:
            t.fates["request forwarded"] += 1
            t.fates["request forwarded: requests in all (pipelined ones included)"] += len(
                out.messages
            )
            if out.end == "tunnel":
                t.fates["request forwarded: of which a granted tunnel"] += 1
        elif out.end == "refused":
            t.fates[f"request refused by the proxy: {out.status}"] += 1
        elif out.end == "parser":
            t.fates["request refused by the parser (400)"] += 1
        elif out.end == "crash":
            t.fates["request: the proxy raised"] += 1
        else:
            t.fates["request head never complete"] += 1
        t.violated(i, data, vs, "request")
        resp = response(c)
        r, vs = check_response_bytes(resp)
        if isinstance(r, str):
            t.fates["response refused: " + r.split(":")[0]] += 1
        else:
            t.fates[f"response head checked: {r.status // 100}xx"] += 1
        t.violated(i, resp, vs, "response")
        done = i + 1
        if progress and done % progress == 0:
            el = time.monotonic() - start
            print(
                f"  {done} inputs, {done / el:.0f}/s, {sum(t.violations.values())} violations",
                flush=True,
            )
    return t, done, time.monotonic() - start


def report(t: Tally, count: int, done: int, seed: int, elapsed: float) -> str:
    uname = subprocess.run(["uname", "-a"], check=False, capture_output=True, text=True).stdout
    uname = uname.strip()
    stopped = "all" if done == count else "stopped by --max-seconds"
    lines = [
        f"date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
        f"machine: {uname}",
        f"cpu: {cpu_model()} (nproc {os.cpu_count()})",
        f"python: {sys.version.split()[0]}, niceness {os.nice(0)}",
        f"command: {' '.join(sys.orig_argv)}",
        f"seed: {seed}; input i is generated from random.Random((seed << 32) | i)",
        f"inputs: {done} of {count} asked ({stopped})",
        f"elapsed: {elapsed:.1f} s, {done / elapsed if elapsed else 0:.0f} inputs/s "
        "(each: a request fed whole, cut once and byte by byte, checked in 3 modes; "
        "a response checked in 8 (HEAD, keep-alive, HTTP/1.0) combinations)",
        "",
        "fates:",
    ]
    lines += [f"  {k}: {n}" for k, n in sorted(t.fates.items())]
    lines += ["", f"violations: {sum(t.violations.values())}"]
    for key, n in sorted(t.violations.items()):
        inv = key.split(" ", 1)[1]
        tag = "known (xfail in tests/unit/test_fuzz_heads.py)" if inv in KNOWN else "NEW"
        index, data, detail = t.examples[key]
        lines += [
            f"  {key}: {n} [{tag}]",
            f"    shortest: index {index}: {data!r}",
            f"    {detail[:400]}",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=1500.0)
    ap.add_argument("--progress", type=int, default=50000)
    ap.add_argument(
        "--out", type=Path, default=None, help="default: bench/results/fuzz-heads-<date>.txt"
    )
    args = ap.parse_args()
    t, done, elapsed = run(args.count, args.seed, args.max_seconds, args.progress)
    text = report(t, args.count, done, args.seed, elapsed)
    print(text, end="")
    out = args.out or RESULTS / f"fuzz-heads-{datetime.date.today().isoformat()}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written: {out}")
    new = [k for k in t.violations if k.split(" ", 1)[1] not in KNOWN]
    sys.exit(1 if new else 0)


if __name__ == "__main__":
    main()
