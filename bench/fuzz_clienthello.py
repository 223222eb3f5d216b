"""The ClientHello parser fuzzed at volume: 10^6 bent and random hellos, judged by invariants.

    python -m bench.fuzz_clienthello --count 1000000 [--seed S] [--max-seconds 1500]

Input i is generated from random.Random((S << 32) | i), so any input is reproduced from
(seed, index) alone. Inputs: 10 % random bytes, 10 % random bytes behind a handshake
record header, 10 % valid hellos (tests/support/hello_builder.py random_spec, checked
against what they hold), 15 % hellos bent where the parser reads deepest (random_bent_spec:
SNI names and entries, ALPN lists, duplicate or misplaced extensions, many tiny records,
versions, legacy fields), 55 % valid hellos (built, or the real ones of Python's ssl,
openssl s_client and curl kept in tests/support/hello_corpus.py) with 1..4 edits (a byte
set, a bit flipped, a cut, bytes inserted or deleted, a 16-bit length rewritten, a slice
repeated). Each input is parsed whole and cut at a random point, and
judged by tests/support/hello_check.py: nothing raised but HelloError (with a listed
reason), byte counts in (len, MAX_HELLO], a Hello's SNI a valid DNS name and its size
within the bytes, a refusal final, a prefix of a Hello only asking for more. The choices
come from a seeded random.Random rather than hypothesis, as bench/fuzz_heads.py explains
(hypothesis' engine costs more per example than the parse and keeps every example).

Prints and writes bench/results/fuzz-clienthello-<date>-<build>.txt: date, machine,
command, the build (pure or compiled), inputs/s, outcomes by reason, every violated
invariant with its shortest input. Exits 1 on any violation.
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

from proxy.core import clienthello
from proxy.core.clienthello import Hello, HelloError, parse_client_hello
from tests.support.hello_builder import (
    build,
    expected,
    mutate,
    random_bent_spec,
    random_mutations,
    random_spec,
)
from tests.support.hello_check import Violation, violations
from tests.support.hello_corpus import CORPUS

RESULTS = Path(__file__).resolve().parent / "results"
HEADS = (b"\x16\x03\x01", b"\x16\x03\x03", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def build_kind() -> str:
    return "compiled" if clienthello.__file__.endswith(".so") else "pure"


class Tally:
    """Outcome counts and the shortest input per violated invariant."""

    def __init__(self) -> None:
        self.fates: collections.Counter[str] = collections.Counter()
        self.violations: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, tuple[int, bytes, str]] = {}

    def violated(self, index: int, data: bytes, vs: list[Violation]) -> None:
        for v in vs:
            self.violations[v.invariant] += 1
            old = self.examples.get(v.invariant)
            if old is None or len(data) < len(old[1]):
                self.examples[v.invariant] = (index, data, v.detail)


def one(i: int, rng: random.Random, real: list[bytes], t: Tally) -> None:
    kind = rng.randrange(100)
    if kind < 10:
        source = "random bytes"
        data = rng.getrandbits(8 * 600).to_bytes(600, "big")[: rng.randrange(600)]
    elif kind < 20:
        source = "random bytes behind a record header"
        n = rng.randrange(600)
        data = rng.choice(HEADS) + rng.getrandbits(8 * 600).to_bytes(600, "big")[:n]
    elif kind < 30:
        source = "valid hello"
        spec = random_spec(rng)
        data = build(spec)
        got = parse_client_hello(data)
        if got != expected(spec):
            t.violated(i, data, [Violation("round trip", f"{got!r} != {expected(spec)!r}")])
    elif kind < 45:
        source = "bent hello"
        data = build(random_bent_spec(rng))
    else:
        source = "mutated hello"
        base = rng.choice(real) if rng.random() < 0.2 else build(random_spec(rng))
        data = mutate(base, random_mutations(rng, len(base)))
    whole, vs = violations(data, rng.randint(0, len(data)))
    if isinstance(whole, HelloError):
        fate = f"refused: {whole.reason} (alert {whole.alert})"
    elif isinstance(whole, Hello):
        fate = "hello"
    elif isinstance(whole, int):
        fate = "needs more bytes"
    else:
        fate = f"raised {type(whole).__name__} (not HelloError)"
    t.fates[f"{source}: {fate}"] += 1
    t.fates[f"all: {fate}"] += 1
    t.violated(i, data, vs)


def run(count: int, seed: int, max_seconds: float, progress: int) -> tuple[Tally, int, float]:
    t = Tally()
    real = [data for data, _ in CORPUS.values()]
    start = time.monotonic()
    done = 0
    for i in range(count):
        if time.monotonic() - start > max_seconds:
            break
        one(i, random.Random((seed << 32) | i), real, t)
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
    stopped = "all" if done == count else "stopped by --max-seconds"
    raised = sum(n for k, n in t.fates.items() if k.startswith("all: raised"))
    lines = [
        f"date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
        f"machine: {uname.strip()}",
        f"cpu: {cpu_model()} (nproc {os.cpu_count()}), load average now "
        + " ".join(f"{x:.2f}" for x in os.getloadavg()),
        f"python: {sys.version.split()[0]}, niceness {os.nice(0)}",
        f"build: {build_kind()} ({clienthello.__file__})",
        f"command: {' '.join(sys.orig_argv)}",
        f"seed: {seed}; input i is generated from random.Random((seed << 32) | i)",
        f"inputs: {done} of {count} asked ({stopped})",
        f"elapsed: {elapsed:.1f} s, {done / elapsed if elapsed else 0:.0f} inputs/s "
        "(each: generated, parsed whole and cut once, judged)",
        f"exceptions other than HelloError: {raised}",
        "",
        "outcomes:",
    ]
    lines += [f"  {k}: {n}" for k, n in sorted(t.fates.items())]
    lines += ["", f"violations: {sum(t.violations.values())}"]
    for key, n in sorted(t.violations.items()):
        index, data, detail = t.examples[key]
        lines += [
            f"  {key}: {n}",
            f"    shortest: index {index}: {data[:300]!r}",
            f"    {detail[:400]}",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=1500.0)
    ap.add_argument("--progress", type=int, default=100000)
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default: bench/results/fuzz-clienthello-<date>-<build>.txt",
    )
    args = ap.parse_args()
    t, done, elapsed = run(args.count, args.seed, args.max_seconds, args.progress)
    text = report(t, args.count, done, args.seed, elapsed)
    print(text, end="")
    day = datetime.date.today().isoformat()
    out = args.out or RESULTS / f"fuzz-clienthello-{day}-{build_kind()}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written: {out}")
    sys.exit(1 if t.violations else 0)


if __name__ == "__main__":
    main()
