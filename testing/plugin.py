"""Running objfs-csi locally, the way a CO would talk to it: for tests, the demo and sanity.

``PluginProcess`` runs ``objfs-csi`` as a separate process (so it can be killed with SIGKILL
and restarted); ``InProcessPlugin`` serves it from this process. ``Client`` holds the three CSI
stubs on a unix socket. ``unmount_all_under`` is the teardown for mounts a failed run left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from csi.main import build_server, parse_args
from csi.node.launcher import runnable_as
from csi.v1 import csi_pb2, csi_pb2_grpc
from fusefs import kernel


def server_uid() -> int:
    """65534 where it can run our interpreter, else 0 (a venv under a private /root)."""
    return 65534 if runnable_as(65534, 65534) else 0


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (none if it is gone)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class Client:
    def __init__(self, socket_path: str) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the socket answers and Probe says ready (the node plugin's zygote is up)."""
        deadline = time.monotonic() + timeout
        grpc.channel_ready_future(self.channel).result(timeout=timeout)
        while not self.identity.Probe(csi_pb2.ProbeRequest(), timeout=timeout).ready.value:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the plugin did not report ready within {timeout:.0f}s")
            time.sleep(0.05)

    def close(self) -> None:
        self.channel.close()


@dataclass
class PluginDirs:
    root: str
    socket: str = ""
    state: str = ""
    cache: str = ""

    def __post_init__(self) -> None:
        # The unprivileged servers must reach the cache below root: make the path traversable.
        os.makedirs(self.root, exist_ok=True)
        os.chmod(self.root, 0o755)
        self.socket = self.socket or os.path.join(self.root, "csi.sock")
        self.state = self.state or os.path.join(self.root, "state")
        self.cache = self.cache or os.path.join(self.root, "cache")

    def argv(self, node_id: str, mode: str = "all") -> list[str]:
        uid = server_uid()
        data = 65532 if uid else 0  # the data service's own uid wherever the servers' is not root
        return ["--endpoint", f"unix://{self.socket}", "--node-id", node_id, "--mode", mode,
                "--state-dir", self.state, "--cache-dir", self.cache, "--server-uid", str(uid), "--server-gid",
                str(uid), "--data-uid", str(data), "--data-gid", str(data),
                "--grant-key-file", os.path.join(self.root, "run", "grants.key")]


@dataclass
class PluginProcess:
    """objfs-csi as a process; with ``pid_namespace`` it is the init of a PID namespace of its own,
    so that killing it kills everything it started, as a restart of its container does."""

    dirs: PluginDirs
    node_id: str = "local-node"
    log_path: str = ""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    extra_args: list[str] = field(default_factory=list)  # argparse keeps the last of repeated options
    pid_namespace: bool = False

    def start(self) -> Client:
        self.log_path = self.log_path or os.path.join(self.dirs.root, "objfs-csi.log")
        prefix = ["unshare", "--pid", "--fork", "--kill-child"] if self.pid_namespace else []
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-c", "import sys; from csi.main import main; sys.exit(main())",
                 *self.dirs.argv(self.node_id), *self.extra_args],
                stdout=log, stderr=log, start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while not os.path.exists(self.dirs.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"objfs-csi did not start; see {self.log_path}")
            time.sleep(0.05)
        client = Client(self.dirs.socket)
        client.wait_ready()
        return client

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            pid = self.proc.pid
            if self.pid_namespace:  # the plugin is the child of unshare, the namespace's init
                pid = next(iter(children(pid)), pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            self.proc.wait(30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


class InProcessPlugin:
    """objfs-csi's gRPC server inside this process, on a unix socket."""

    def __init__(self, dirs: PluginDirs, node_id: str = "local-node", mode: str = "all",
                 extra_args: list[str] | None = None) -> None:
        self.dirs = dirs
        # argparse keeps the last of repeated options: extra_args override the defaults.
        self.args: Namespace = parse_args([*dirs.argv(node_id, mode), *(extra_args or [])])
        if os.path.exists(dirs.socket):
            os.unlink(dirs.socket)
        self.server, self.node = build_server(self.args)
        if self.node is not None:
            self.node.reconcile()
        self.server.add_insecure_port(f"unix://{dirs.socket}")

    def __enter__(self) -> Client:
        self.server.start()
        self.client = Client(self.dirs.socket)
        self.client.wait_ready()
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.server.stop(grace=1).wait()
        if getattr(self.args, "metrics", None) is not None:
            self.args.metrics.close()
        for part in ("data", "broker"):  # the data service exits when its link closes
            running = getattr(self.args, part, None)
            if running is not None:
                running.close()


@contextlib.contextmanager
def in_process_plugin(prefix: str, node_id: str, extra_args: list[str] | None = None
                      ) -> Iterator[tuple[Client, PluginDirs]]:
    """An in-process objfs-csi in a fresh temp dir; on exit whatever it left mounted is detached
    and the dir removed. ``extra_args``: more objfs-csi flags."""
    root = tempfile.mkdtemp(prefix=prefix)
    dirs = PluginDirs(root)
    try:
        with InProcessPlugin(dirs, node_id=node_id, extra_args=extra_args) as client:
            yield client, dirs
    finally:
        unmount_all_under(root)
        shutil.rmtree(root, ignore_errors=True)


def unmount_all_under(root: str) -> list[str]:
    """Lazily detach every mount below ``root`` (deepest first); returns what was detached."""
    prefix = os.path.normpath(root) + "/"
    found = sorted((m.mount_point for m in kernel.mounts() if m.mount_point.startswith(prefix)), reverse=True)
    for mp in found:
        with contextlib.suppress(OSError):
            kernel.unmount(mp, lazy=True)
    return found


def objfs_serve_pids() -> list[int]:
    """Pids of running ``objfs serve`` processes (any owner)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and b"--fuse-fd" in argv and any(a.endswith(b"objfs") or b"fusefs" in a for a in argv):
            pids.append(int(name))
    return pids
