"""The filesystems under test: objfs, s3fs-fuse and rclone mount, each in two modes.

Every client mounts a prefix of the same bucket of the same ``rclone serve s3``. Secrets go to
the peers through files readable by root only (s3fs's passwd_file, an rclone config file) and to
objfs through the AWS_* environment variables that its command line documents.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench import procs

VENV_BIN = Path(sys.executable).parent


@dataclass
class Store:
    """Where the clients find the data, and the secrets files that point them there."""

    endpoint: str  # the server itself
    proxy_endpoint: str  # the counting proxy in front of it
    bucket: str
    access_key: str
    secret_key: str
    workdir: Path
    #: a latency-adding proxy in front of the counting proxy (bench/latency.py): a real network's round trip
    latency_endpoint: str = ""
    _files: dict[str, Path] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """Environment for children that take AWS credentials from it (objfs, s5cmd)."""
        return dict(os.environ, AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key,
                    AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1")

    def _private_file(self, name: str, text: str) -> Path:
        if name not in self._files:
            path = self.workdir / "secrets" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.parent.chmod(0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            self._files[name] = path
        return self._files[name]

    def s3fs_passwd(self) -> Path:
        return self._private_file("s3fs-passwd", f"{self.access_key}:{self.secret_key}\n")

    def rclone_config(self) -> Path:
        remotes = []
        for name, url in (("direct", self.endpoint), ("proxy", self.proxy_endpoint),
                          ("slow", self.latency_endpoint or self.proxy_endpoint)):
            remotes.append(f"[{name}]\ntype = s3\nprovider = Other\nendpoint = {url}\n"
                           f"access_key_id = {self.access_key}\nsecret_access_key = {self.secret_key}\n"
                           "region = us-east-1\n")
        return self._private_file("rclone.conf", "\n".join(remotes))


@dataclass
class Mounted:
    path: Path
    proc: subprocess.Popen[bytes] | None  # the FUSE server when we started it in the foreground
    server_pids: set[int]  # processes serving the mount (for RSS)
    helper_pids: set[int] = field(default_factory=set)  # objfs's data service of the mount, when it has one

    @property
    def cpu_pids(self) -> set[int]:
        """Whose CPU time the mount costs (with their descendants: ``procs.tree_cpu_seconds``)."""
        return self.server_pids | self.helper_pids


@dataclass(frozen=True)
class Client:
    """One filesystem in one mode. ``family`` is objfs, s3fs or rclone; ``cache`` the disk-cache mode."""

    name: str
    family: str
    cache: bool
    extra: tuple[str, ...] = ()  # more flags of the mount command
    @property
    def is_peer(self) -> bool:
        return self.family != "objfs"

    @contextmanager
    def mount(self, store: Store, prefix: str, mountpoint: Path, *, via_proxy: bool = False,
              cache_dir: Path | None = None, slow: bool = False) -> Iterator[Mounted]:
        """Mount ``bucket/prefix`` at ``mountpoint``; unmount on exit, whatever happened. ``via_proxy``:
        through the counting proxy; ``slow``: through the latency proxy (and the counting one behind it)."""
        mountpoint.mkdir(parents=True, exist_ok=True)
        own_cache = cache_dir is None
        if own_cache:
            cache_dir = Path(tempfile.mkdtemp(prefix=f"cache-{self.name}-", dir=store.workdir))
        assert cache_dir is not None
        endpoint = store.latency_endpoint if slow else store.proxy_endpoint if via_proxy else store.endpoint
        log = open(store.workdir / f"{self.name}.log", "ab")
        proc: subprocess.Popen[bytes] | None = None
        try:
            if self.family == "objfs":
                cmd = [str(VENV_BIN / "objfs"), "mount", f"s3://{store.bucket}/{prefix}", str(mountpoint),
                       "--endpoint-url", endpoint]
                cmd += ["--cache-dir", str(cache_dir)] if self.cache else ["--no-cache"]
                cmd += self.extra
                procs.register(mountpoint, None)
                subprocess.run(cmd, stdout=log, stderr=log, env=store.env(), check=True, timeout=60)
                procs.wait_mounted(mountpoint, None)
                pids = procs.fuse_server_pids(mountpoint)
                helpers = procs.data_service_pids(cache_dir) if "--data-service" in self.extra else set()
            else:
                proc = subprocess.Popen(self._peer_cmd(store, prefix, mountpoint, endpoint, cache_dir),
                                        stdout=log, stderr=log, env=self._peer_env(), start_new_session=True)
                procs.register(mountpoint, proc)
                procs.wait_mounted(mountpoint, proc)
                pids = {proc.pid}
                helpers = set()
            yield Mounted(mountpoint, proc, pids, helpers)
        finally:
            if self.family == "objfs" and procs.is_mounted(mountpoint):
                subprocess.run([str(VENV_BIN / "objfs"), "unmount", str(mountpoint)], stdout=log, stderr=log,
                               timeout=60, check=False)
            procs.force_unmount(mountpoint, proc)
            if self.family == "objfs":
                procs.kill_lingering(procs.fuse_server_pids(mountpoint))
            log.close()
            if own_cache:
                shutil.rmtree(cache_dir, ignore_errors=True)

    def _peer_env(self) -> dict[str, str]:
        # The peers must not pick up credentials from the environment: they get them from files.
        return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}

    def _peer_cmd(self, store: Store, prefix: str, mountpoint: Path, endpoint: str, cache_dir: Path) -> list[str]:
        if self.family == "s3fs":
            opts = f"url={endpoint},use_path_request_style,passwd_file={store.s3fs_passwd()}"
            if self.cache:
                opts += f",use_cache={cache_dir}"
            source = f"{store.bucket}:/{prefix}" if prefix else store.bucket
            return ["s3fs", source, str(mountpoint), "-f", "-o", opts]
        if self.family == "rclone":
            remote = {store.endpoint: "direct", store.proxy_endpoint: "proxy"}.get(endpoint, "slow")
            return [str(VENV_BIN / "rclone"), "mount", f"{remote}:{store.bucket}/{prefix}", str(mountpoint),
                    "--config", str(store.rclone_config()), "--cache-dir", str(cache_dir),
                    "--vfs-cache-mode", "full" if self.cache else "off"]
        raise ValueError(f"unknown client family {self.family}")


OBJFS = Client("objfs", "objfs", True)
OBJFS_NOCACHE = Client("objfs-nocache", "objfs", False)
#: the shape of a Kubernetes node: credentials, store client and node cache in a data service process,
#: the FUSE server reaching them through one socket (what every pod's sidecar does)
OBJFS_GRANT = Client("objfs-grant", "objfs", True, ("--data-service", "process"))
#: a volume that keeps each file's mtime, mode and owner in its object's metadata (``fileMetadata``):
#: S3 listings carry none, so a walk asks the store once per file (small files: a GET that their read takes)
OBJFS_META = Client("objfs-meta", "objfs", True, ("--file-metadata",))
S3FS = Client("s3fs", "s3fs", False)
S3FS_CACHE = Client("s3fs-cache", "s3fs", True)
RCLONE = Client("rclone", "rclone", False)
RCLONE_FULL = Client("rclone-full", "rclone", True)
ALL_MOUNTS = (OBJFS, OBJFS_GRANT, OBJFS_NOCACHE, OBJFS_META, S3FS, S3FS_CACHE, RCLONE, RCLONE_FULL)
QUICK_MOUNTS = (OBJFS, S3FS, RCLONE_FULL)


def objfs_available() -> str | None:
    """None when ``objfs mount`` can be used, else the reason it cannot."""
    exe = VENV_BIN / "objfs"
    if not exe.exists():
        return f"{exe} is not installed"
    try:
        out = subprocess.run([str(exe), "mount", "--help"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"objfs mount --help failed: {exc}"
    if out.returncode != 0:
        return "objfs mount --help failed: " + (out.stderr or out.stdout).decode(errors="replace").strip()[-300:]
    return None
