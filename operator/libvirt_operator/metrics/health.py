"""Health endpoints of both components (LVO_HEALTH_PORT, LVO_HEALTH_ADDRESS): /livez and /readyz.

A component registers named checks; a daemon thread runs them every few seconds (a check may
block, e.g. on an API call) and the HTTP server answers from the last results, so a probe
never waits on a dependency:

- ``/readyz``: 200 while every check passed on its last run, else 503 with the failing ones
  (the Pod leaves its Services; Kubernetes does not restart it);
- ``/livez``: 200 while the checker thread keeps running its rounds (it is the process's own
  health, not its dependencies': a restart would not bring libvirtd or the API server back).

The body is JSON: ``{"ready": bool, "checks": {name: "ok" | reason}}``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "0.0.0.0"
INTERVAL_SECONDS = 3.0
# /livez fails when the checker has not finished a round for this long (a check is stuck).
STALE_SECONDS = 60.0

Check = Callable[[], str | None]  # None when healthy, else why not; an exception counts as failure


class Health:
    def __init__(self, checks: Mapping[str, Check], interval: float = INTERVAL_SECONDS):
        self.checks = dict(checks)
        self.interval = interval
        self.results: dict[str, str] = {name: "not checked yet" for name in self.checks}
        self.last_round = time.monotonic()
        self._lock = threading.Lock()

    def run_once(self) -> dict[str, str]:
        results = {}
        for name, check in self.checks.items():
            try:
                problem = check()
            except Exception as exc:  # a failing check is a result, never the end of the checker
                problem = f"{type(exc).__name__}: {exc}"
            results[name] = "ok" if problem is None else problem
        with self._lock:
            self.results, self.last_round = results, time.monotonic()
        return results

    def snapshot(self) -> tuple[bool, bool, dict[str, str]]:
        """(alive, ready, results)."""
        with self._lock:
            results, last = dict(self.results), self.last_round
        alive = time.monotonic() - last < max(STALE_SECONDS, 3 * self.interval)
        return alive, alive and all(r == "ok" for r in results.values()), results

    def _loop(self) -> None:
        while True:
            self.run_once()
            time.sleep(self.interval)

    def serve(self, port: int, address: str = DEFAULT_ADDRESS) -> ThreadingHTTPServer:
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                alive, ready, results = health.snapshot()
                if self.path.split("?")[0] == "/livez":
                    ok = alive
                elif self.path.split("?")[0] in ("/readyz", "/healthz"):
                    ok = ready
                else:
                    self.send_error(404)
                    return
                body = json.dumps({"ready": ready, "alive": alive, "checks": results}).encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # probes every few seconds: no access log
                pass

        server = ThreadingHTTPServer((address, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=self._loop, name="health-checks", daemon=True).start()
        threading.Thread(target=server.serve_forever, name="health-http", daemon=True).start()
        log.info("health on http://%s:%d/livez and /readyz", address, server.server_address[1])
        return server


def serve_from_env(checks: Mapping[str, Check], env: Mapping[str, str] | None = None) -> ThreadingHTTPServer | None:
    """Serve the checks when LVO_HEALTH_PORT is set (the chart sets it); None otherwise."""
    env = os.environ if env is None else env
    port = int(env.get("LVO_HEALTH_PORT") or 0)
    if not port:
        return None
    try:
        return Health(checks).serve(port, env.get("LVO_HEALTH_ADDRESS") or DEFAULT_ADDRESS)
    except OSError as exc:
        raise SystemExit(f"cannot serve health on port {port}: {exc.strerror or exc}") from exc
