"""The metric names a Grafana dashboard's PromQL uses, to check them against a scrape.

Reads every panel target's `expr` and every query variable's `label_values(...)`, drops
what is not a metric name (strings, label matchers, ranges, by/without/on clauses,
Grafana variables, function names, operators' keywords) and returns the identifiers
left. Anything left that is not a real series name is exactly what a typo looks like.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_BRACES = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_CLAUSE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "by", "without", "inf", "nan"})
_LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)")


def expr_names(expr: str) -> set[str]:
    """The metric names one PromQL expression reads."""
    text = _STRING.sub(" ", expr)
    text = _VARIABLE.sub(" ", text)
    text = _BRACES.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _CLAUSE.sub(" ", text)
    out: set[str] = set()
    for m in _IDENT.finditer(text):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        out.add(name)
    return out


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the panels' targets (rows' nested panels included)."""
    return [d["expr"] for d in _walk(dashboard.get("panels", [])) if isinstance(d.get("expr"), str)]


def dashboard_names(dashboard: dict[str, Any]) -> set[str]:
    """Every metric name the dashboard's queries and query variables use."""
    names: set[str] = set()
    for e in exprs(dashboard):
        names |= expr_names(e)
    for var in dashboard.get("templating", {}).get("list", []):
        q = var.get("query")
        text = q.get("query", "") if isinstance(q, dict) else q if isinstance(q, str) else ""
        if var.get("type") == "query":
            names |= set(_LABEL_VALUES.findall(text))
    return names


def series_names(exposition: str) -> set[str]:
    """The names of the samples in a Prometheus text scrape (histogram series as printed:
    name_bucket, name_sum, name_count)."""
    out: set[str] = set()
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            out.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return out
