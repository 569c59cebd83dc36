"""A stand-in for the few Kubernetes API calls the admission webhook makes.

A real kube-apiserver cannot run in the unit tests, so this is the one mocked piece: an HTTPS server
on loopback (its own CA, so the webhook's client really verifies it) that holds objects by API path
and answers GET, PUT (with resourceVersion conflicts) and PATCH (RFC 6902, applied with jsonpatch).
It records every request and checks the bearer token.
"""

from __future__ import annotations

import copy
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonpatch

from csi.webhook import certs


class FakeApiServer:
    def __init__(self, workdir: Path, version: tuple[str, str] = ("1", "30+"), token: str = "test-token") -> None:
        self.objects: dict[str, dict[str, Any]] = {"/version": {"major": version[0], "minor": version[1],
                                                               "gitVersion": f"v{version[0]}.{version[1]}"}}
        self.requests: list[tuple[str, str]] = []
        self.token = token
        self.lock = threading.Lock()
        tls = certs.generate(["127.0.0.1"])
        workdir.mkdir(parents=True, exist_ok=True)
        self.ca_file = workdir / "api-ca.crt"
        self.ca_file.write_bytes(tls.ca_pem)
        self.token_file = workdir / "token"
        self.token_file.write_text(token)
        cert_file, key_file = tls.write(str(workdir / "api-tls"))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_file, key_file)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.server_address[1]}"

    def put(self, path: str, obj: dict[str, Any]) -> None:
        with self.lock:
            self.objects[path] = {**obj, "metadata": {"resourceVersion": "1", **obj.get("metadata", {})}}

    def get(self, path: str) -> dict[str, Any]:
        with self.lock:
            return copy.deepcopy(self.objects[path])

    def count(self, method: str, path_part: str = "") -> int:
        with self.lock:
            return sum(1 for m, p in self.requests if m == method and path_part in p)

    def __enter__(self) -> FakeApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, message: str) -> None:
                self._answer(code, {"kind": "Status", "status": "Failure", "code": code, "message": message})

            def _handle(self, method: str) -> None:
                with api.lock:
                    api.requests.append((method, self.path))
                if self.headers.get("Authorization") != f"Bearer {api.token}":
                    self._status(401, "Unauthorized")
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                with api.lock:
                    current = api.objects.get(self.path)
                    if current is None and method == "GET" and any(
                            p.rsplit("/", 1)[0] == self.path for p in api.objects):
                        # a collection: the objects right under it, as a list (no paging, no selectors)
                        items = [copy.deepcopy(o) for p, o in api.objects.items() if p.rsplit("/", 1)[0] == self.path]
                        self._answer(200, {"kind": "List", "items": items})
                        return
                    if current is None:
                        self._status(404, f"{self.path} not found")
                        return
                    if method == "GET":
                        self._answer(200, current)
                        return
                    version = int(current.get("metadata", {}).get("resourceVersion", "0"))
                    if body is None:
                        self._status(400, f"{method} without a body")
                        return
                    if method == "PUT":
                        if body["metadata"].get("resourceVersion") != str(version):
                            self._status(409, "the object has been modified")
                            return
                        new = body
                    else:  # PATCH, application/json-patch+json
                        try:
                            new = jsonpatch.apply_patch(current, body)
                        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                            self._status(422, str(e))
                            return
                    new.setdefault("metadata", {})["resourceVersion"] = str(version + 1)
                    api.objects[self.path] = new
                    self._answer(200, new)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_PUT(self) -> None:
                self._handle("PUT")

            def do_PATCH(self) -> None:
                self._handle("PATCH")

        return Handler
