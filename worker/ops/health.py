"""/metrics, /healthz and /readyz over HTTP, for Prometheus and the kubelet's probes.

Liveness says the run loop still turns (a stuck worker gets restarted); readiness says the
model is loaded, the consumer group joined and no service the worker needs is out of reach
(a pod still loading, or cut off from its broker or Redis, does not count as available to a
rollout; it waits the outage out in place, see worker/runtime/outages.py).
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST

from worker.ops.metrics import WorkerMetrics


class Health:
    """Flags the worker sets as it comes up, and a heartbeat from its loop."""

    def __init__(self, stall_seconds: float = 300.0) -> None:
        self.stall_seconds = stall_seconds
        self.model_loaded = False
        self.group_joined = False
        self._last_beat: float | None = None
        self._cut_off: set[str] = set()  # services the worker cannot reach now
        self._lock = threading.Lock()

    def beat(self) -> None:
        with self._lock:
            self._last_beat = time.monotonic()

    def alive(self) -> bool:
        """True until the loop, once started, has not beaten for `stall_seconds`."""
        with self._lock:
            last = self._last_beat
        return last is None or time.monotonic() - last < self.stall_seconds

    def cut_off(self, service: str) -> None:
        with self._lock:
            self._cut_off.add(service)

    def reconnected(self, service: str) -> bool:
        """Mark `service` reachable again; True if it had been cut off."""
        with self._lock:
            was_cut_off = service in self._cut_off
            self._cut_off.discard(service)
        return was_cut_off

    def not_ready_because(self) -> str | None:
        if not self.model_loaded:
            return "model not loaded"
        with self._lock:
            cut_off = sorted(self._cut_off)
        if cut_off:
            return f"cut off from {' and '.join(cut_off)}"
        if not self.group_joined:
            return "consumer group not joined"
        return None


class MetricsServer:
    """A ThreadingHTTPServer on a daemon thread; port 0 binds a free port."""

    def __init__(self, metrics: WorkerMetrics, health: Health, host: str, port: int) -> None:
        handler = _handler(metrics, health)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve(
    metrics: WorkerMetrics, health: Health, host: str = "0.0.0.0", port: int = 9400
) -> MetricsServer:
    return MetricsServer(metrics, health, host, port)


def _handler(metrics: WorkerMetrics, health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server protocol)
            if self.path == "/metrics":
                self._reply(200, metrics.render(), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                ok = health.alive()
                self._reply(200 if ok else 503, b"ok\n" if ok else b"run loop stalled\n")
            elif self.path == "/readyz":
                reason = health.not_ready_because()
                body = b"ready\n" if reason is None else reason.encode() + b"\n"
                self._reply(200 if reason is None else 503, body)
            else:
                self._reply(404, b"not found\n")

        def _reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Probes every few seconds would drown the worker's own logs."""

    return Handler
