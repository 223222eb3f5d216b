"""The master's log lines as JSON ([log] format = "json"), one object per record.

Owns a logging.Formatter with the same fields as the workers' JSON error lines
(proxy.worker.errlines): ts, level, node, pid, msg, and detail for a traceback. Chosen
when the master starts; a reload does not change it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson


class JsonFormatter(logging.Formatter):
    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        ms = int(record.created * 1000.0) % 1000
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{ms:03d}Z"
        rec: dict[str, Any] = {
            "ts": ts,
            "level": record.levelname.lower(),
            "node": self.node,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            rec["detail"] = self.formatException(record.exc_info)
        return orjson.dumps(rec).decode()


def json_handler(node: str) -> logging.Handler:
    """A stderr handler writing JSON lines."""
    h = logging.StreamHandler()
    h.setFormatter(JsonFormatter(node))
    return h
