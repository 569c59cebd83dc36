"""A loopback TCP proxy that adds a network's latency: every chunk is forwarded ``delay`` seconds
after it arrived, in both directions, so a request/response pays a round trip of ``2 * delay``.

This machine's kernel has no sch_netem (``tc qdisc ... netem`` is unknown), so the latency is added
in user space. Chunks are not held back behind each other: a reader thread stamps each chunk with
its arrival time and a sender thread forwards it once its time has come, so bandwidth is not cut
to one chunk per delay (a long GET streams at full speed after its first byte) and requests
pipelined on one connection keep their order.

Put it in front of ``testing.proxy.CountingProxy`` (client -> latency -> counting -> store) to count
requests at a store with a real network's round trip. The benchmark runs it as a process of its own
(``LatencyProcess``): in the harness's process its threads would wait for the GIL behind a reader
that holds it (safetensors' loader keeps it across the page faults of its mmap: a deadlock), and
their CPU would count against the client measured.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Self

CHUNK = 256 * 1024


class LatencyProxy:
    """``with LatencyProxy(upstream_port, delay=0.010) as lp: ... lp.endpoint ...``."""

    def __init__(self, upstream_port: int, delay: float, upstream_host: str = "127.0.0.1") -> None:
        if delay < 0:
            raise ValueError(f"delay must be >= 0 seconds, got {delay}")
        self.upstream = (upstream_host, upstream_port)
        self.delay = delay
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port = int(self.listener.getsockname()[1])
        self._stopping = False
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.connections = 0  # accepted since start: clients that reuse connections keep this low

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        threading.Thread(target=self._accept, name="latency-accept", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self.listener.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._socks.update((client, upstream))
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            done = threading.Semaphore(0)
            for src, dst in ((client, upstream), (upstream, client)):
                q: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()
                threading.Thread(target=self._receive, args=(src, q), daemon=True).start()
                threading.Thread(target=self._send, args=(q, dst, done), daemon=True).start()
            threading.Thread(target=self._close_when_done, args=(client, upstream, done), daemon=True).start()

    def _receive(self, src: socket.socket, q: queue.SimpleQueue[tuple[float, bytes]]) -> None:
        """Stamp each chunk with the time it may leave; an empty chunk says the sender closed."""
        while True:
            try:
                data = src.recv(CHUNK)
            except OSError:
                data = b""
            q.put((time.monotonic() + self.delay, data))
            if not data:
                return

    def _send(self, q: queue.SimpleQueue[tuple[float, bytes]], dst: socket.socket, done: threading.Semaphore) -> None:
        try:
            while True:
                due, data = q.get()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)  # half-close, as the sender did
                    return
                try:
                    dst.sendall(data)
                except OSError:
                    # the other side is gone: drain until the receiver's end marker
                    while q.get()[1]:
                        pass
                    return
        finally:
            done.release()

    def _close_when_done(self, a: socket.socket, b: socket.socket, done: threading.Semaphore) -> None:
        done.acquire()
        done.acquire()
        with self._lock:
            self._socks.difference_update((a, b))
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.close()


class LatencyProcess:
    """``with LatencyProcess(upstream_port, delay) as lp: ... lp.endpoint ...``: a ``LatencyProxy`` in a
    child process (``python -m bench.latency UPSTREAM_PORT DELAY_SECONDS``), stopped on exit."""

    def __init__(self, upstream_port: int, delay: float) -> None:
        self.upstream_port = upstream_port
        self.delay = delay
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.latency", str(self.upstream_port), str(self.delay)],
                                     stdout=subprocess.PIPE, stdin=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the latency proxy did not start")
        self.port = int(line)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            # here, not at the top: the proxy's own process (this module's main) needs no test servers
            from testing.servers import stop_process

            stop_process(self.proc)


def main() -> None:
    """Serve until stdin closes (the parent is gone) or SIGTERM; print the port first."""
    upstream, delay = int(sys.argv[1]), float(sys.argv[2])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with LatencyProxy(upstream, delay) as proxy:
        print(proxy.port, flush=True)
        sys.stdin.buffer.read()


if __name__ == "__main__":
    main()
