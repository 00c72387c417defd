"""A stand-in replica for the balancer tests: answers /readyz like tapeserve (200 ready, 503 not), and
any other request with 200 and its name, counting them. Not a tapeserve: it only lets a test hold a
replica up but not ready, or kill one in a microsecond, without paying for TensorFlow.

    python tests/deploy/standin.py PORT NAME {ready,starting}

Control (sent to the stand-in directly, never through the balancer, and not counted):
GET /_standin/count -> {"requests": n}; PUT /_standin/ready with body "1" or "0".
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StandIn(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the balancer's connection reuse expects
    name = ""
    ready = False
    requests = 0
    lock = threading.Lock()

    def _answer(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Standin", self.name)
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _any(self) -> None:
        body = self._body()
        cls = type(self)
        if self.path == "/readyz":
            status = 200 if cls.ready else 503
            self._answer(status, {"status": "ready" if cls.ready else "starting"})
        elif self.path == "/_standin/count":
            self._answer(200, {"requests": cls.requests})
        elif self.path == "/_standin/ready":
            cls.ready = body.strip() == b"1"
            self._answer(200, {"ready": cls.ready})
        else:
            with cls.lock:
                cls.requests += 1
            # What the balancer adds on the way, for the tests to check.
            seen = {
                "forwarded_for": self.headers.get("X-Forwarded-For"),
                "request_id": self.headers.get("X-Request-ID"),
            }
            self._answer(200, {"standin": self.name, **seen})

    do_GET = do_POST = do_PUT = _any

    def log_message(self, format: str, *args: object) -> None:
        pass  # the balancer's log names the replica; the stand-in's own lines add nothing


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # HAProxy closes its check connections as it likes; a reset is not news


def main() -> None:
    port, name, state = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    StandIn.name, StandIn.ready = name, state == "ready"
    server = _Server(("127.0.0.1", port), StandIn)
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
