"""A webhook receiver for tests: a real HTTP server on loopback that checks every request's
``Hutch-Signature`` with the code README.md gives users, refuses what fails (401), answers 500 to
as many requests as it is told to fail first, and keeps what it accepted. It can be stopped and
started again on the same port.

The check is README.md's own code, executed from the README: so the documentation is what is
tested, and a fault in the service's signing cannot hide behind the same fault in a check of its own.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from benchmarks.harness import free_port

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_verifier() -> Callable[[str, str, bytes], bool]:
    """``verify_hutch_signature(secret, header, body)`` as README.md defines it."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    code = [block for block in blocks if "def verify_hutch_signature" in block]
    assert len(code) == 1, "README.md should define verify_hutch_signature once"
    lines = code[0].splitlines()
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    namespace: dict[str, Any] = {}
    exec("\n".join(line[indent:] for line in lines), namespace)
    return namespace["verify_hutch_signature"]


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class Receiver:
    """One receiver at ``url(path)``; ``accepted`` and ``refused`` in the order they came."""

    def __init__(self, secret: str, fail_first: int = 0) -> None:
        self.secret = secret
        self.port = free_port()
        self.verify = readme_verifier()
        self.fail_first = fail_first
        self.accepted: list[Received] = []
        self.refused: list[Received] = []  # bad signatures
        self.failed = 0  # requests answered 500 on purpose
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                seen = Received(self.path, dict(self.headers.items()), json.loads(body))
                status = receiver._answer(seen, self.headers.get("Hutch-Signature", ""), body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)  # reuses the port
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        """Stop listening: connections are refused until :meth:`start`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _answer(self, seen: Received, header: str, body: bytes) -> int:
        with self._lock:
            if not self.verify(self.secret, header, body):
                self.refused.append(seen)
                return 401
            if self.failed < self.fail_first:
                self.failed += 1
                return 500
            self.accepted.append(seen)
            return 200
