"""Build of edgeproxy: the request path is compiled to C with mypyc when it can be.

Everything else is in setup.cfg. The modules below are plain, mypy-strict Python
(they also run as they are); mypyc turns them into C extensions, which cuts the
Python time of a proxied request by about 40 % (README, "Development").
EDGEPROXY_PURE=1 builds a pure-Python package instead.
"""

from __future__ import annotations

import os

from setuptools import setup

# The request path: per-request code and what it calls per request.
COMPILED = [
    "proxy/worker/batch.py",
    "proxy/worker/client.py",
    "proxy/worker/client_io.py",
    "proxy/worker/context.py",
    "proxy/worker/exchange.py",
    "proxy/core/clienthello.py",
    "proxy/core/conn_state.py",
    "proxy/core/headers.py",
    "proxy/telemetry/metrics.py",
    "proxy/telemetry/histograms.py",
    "proxy/core/request.py",
    "proxy/core/request_head.py",
    "proxy/core/router.py",
    "proxy/worker/routing.py",
    "proxy/worker/walk.py",
    "proxy/worker/walk_reads.py",
    "proxy/worker/splice.py",
    "proxy/worker/tls.py",
    "proxy/master/static_table.py",
    "proxy/worker/upstream.py",
    "proxy/core/target.py",
    "proxy/core/traceparent.py",
    "shm/candidate.py",
    "shm/inflight.py",
    "shm/reader.py",
    "shm/view.py",
]


def ext_modules() -> list[object]:
    if os.environ.get("EDGEPROXY_PURE") == "1":
        return []
    from mypyc.build import mypycify

    return list(mypycify(COMPILED, opt_level="3", group_name="proxy.native"))


setup(ext_modules=ext_modules())
