"""An OTLP/HTTP trace receiver for tests: POSTs of protobuf ExportTraceServiceRequest,
decoded with the official definitions (the opentelemetry-proto package), since no
collector binary can be installed here.

It listens on 127.0.0.1 in a thread of the test process, keeps every decoded request
with its headers, and can answer the first `fail_first` requests with 503 (a collector
that is briefly unavailable). Every wait has a deadline.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)

MAX_BODY = 16 << 20


class Receiver:
    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.lock = threading.Lock()
        self.requests: list[tuple[dict[str, str], ExportTraceServiceRequest]] = []
        self.answered = 0  # requests seen, failed ones included
        self.bad: list[str] = []  # requests that were not a decodable export
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # http.server's naming
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(min(n, MAX_BODY))
                with receiver.lock:
                    receiver.answered += 1
                    fail = receiver.answered <= receiver.fail_first
                if fail:
                    self.reply(503)
                    return
                if self.path != "/v1/traces" or (
                    self.headers.get("Content-Type") != "application/x-protobuf"
                ):
                    with receiver.lock:
                        receiver.bad.append(f"{self.path} {self.headers.get('Content-Type')}")
                    self.reply(415)
                    return
                try:
                    msg = ExportTraceServiceRequest.FromString(body)
                except Exception as e:  # a decode error of any kind is the test's finding
                    with receiver.lock:
                        receiver.bad.append(f"undecodable: {e}")
                    self.reply(400)
                    return
                with receiver.lock:
                    receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, msg))
                self.reply(200)

            def reply(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def spans(self) -> list[Any]:
        """Every span received so far, with its resource's attributes as `resource`."""
        out = []
        with self.lock:
            for _, msg in self.requests:
                for rs in msg.resource_spans:
                    for ss in rs.scope_spans:
                        for s in ss.spans:
                            out.append((rs.resource, s))
        return out

    def wait_spans(self, n: int, timeout: float = 10.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        got = self.spans()
        while len(got) < n and time.monotonic() < deadline:
            time.sleep(0.05)
            got = self.spans()
        return got

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def attrs(kvs: Any) -> dict[str, Any]:
    """KeyValue list -> {key: python value}."""
    out: dict[str, Any] = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which else None
    return out
