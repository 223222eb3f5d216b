"""Prometheus text (0.0.4) as tests read it: each sample line as (name, labels) -> value,
and the metric names a scrape holds; a malformed line fails loudly."""

from __future__ import annotations

import re

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')

Key = tuple[str, frozenset[tuple[str, str]]]


def samples(text: str) -> dict[Key, float]:
    """Every sample of `text`; AssertionError on a line that is not one, or a duplicate."""
    out: dict[Key, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, raw, value = m.groups()
        labels: list[tuple[str, str]] = []
        pos = 0
        while raw and pos < len(raw):
            lm = _LABEL.match(raw, pos)
            assert lm, f"bad labels in {line!r}"
            labels.append((lm.group(1), lm.group(2)))
            pos = lm.end()
        key = (name, frozenset(labels))
        assert key not in out, f"duplicate series {line!r}"
        out[key] = float(value)
    return out


def label_values(s: dict[Key, float], name: str, label: str) -> set[str]:
    """The values `label` takes over the samples of metric `name`."""
    return {dict(labels)[label] for n, labels in s if n == name and label in dict(labels)}


def get(s: dict[Key, float], name: str, **labels: str) -> float:
    """One sample's value; KeyError when absent."""
    return s[(name, frozenset(labels.items()))]


def names(text: str) -> set[str]:
    """The metric names `text` has samples of, histogram ones also by family name."""
    out: set[str] = set()
    for name, _ in samples(text):
        out.add(name)
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix):
                out.add(name[: -len(suffix)])
    return out
