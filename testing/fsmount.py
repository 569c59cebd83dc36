"""Test helper: a real objfs FUSE mount served by ``objfs serve`` on an fd we mounted ourselves
(the same path the CSI node plugin takes), cleaned up with a lazy unmount."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fusefs import kernel
from fusefs.config import MountConfig
from fusefs.proc.serve import raise_readahead

READY_TIMEOUT = 30.0


@dataclass
class Mounted:
    path: Path
    config: MountConfig
    proc: subprocess.Popen[bytes]
    log: Path

    def unmount(self) -> None:
        if kernel.find_mount(str(self.path)) is not None:
            try:
                kernel.unmount(str(self.path), lazy=True)
            except OSError:
                pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_serve(config: MountConfig, fuse_fd: int | None, log: Path, mountpoint: str | None = None,
                env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Spawn ``objfs serve``; return the process and the line it wrote on the ready fd."""
    cfg_r, cfg_w = os.pipe()
    ready_r, ready_w = os.pipe()
    cmd = [sys.executable, "-m", "fusefs.proc.cli", "serve", "--config-fd", str(cfg_r), "--ready-fd", str(ready_w)]
    fds = [cfg_r, ready_w]
    if fuse_fd is not None:
        os.set_inheritable(fuse_fd, True)
        cmd += ["--fuse-fd", str(fuse_fd)]
        fds.append(fuse_fd)
    if mountpoint is not None:
        cmd += ["--mountpoint", mountpoint]
    with open(log, "ab") as logf:
        proc = subprocess.Popen(cmd, pass_fds=fds, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=str(Path(__file__).resolve().parent.parent), env=env)
    os.close(cfg_r)
    os.close(ready_w)
    with os.fdopen(cfg_w, "wb") as f:
        f.write(config.to_json().encode())
    buf = b""
    deadline = time.monotonic() + READY_TIMEOUT
    try:
        while b"\n" not in buf and time.monotonic() < deadline:
            r, _, _ = select.select([ready_r], [], [], 0.5)
            if r:
                chunk = os.read(ready_r, 4096)
                if not chunk:
                    break
                buf += chunk
    finally:
        os.close(ready_r)
    return proc, buf.decode(errors="replace").strip()


def mount(config: MountConfig, target: Path, log: Path, env: dict[str, str] | None = None) -> Mounted:
    """``env``: the server's whole environment (ambient credentials), else this process's."""
    target.mkdir(parents=True, exist_ok=True)
    fd = kernel.mount_fuse(str(target), read_only=config.read_only, allow_other=config.allow_other)
    try:
        proc, line = start_serve(config, fd, log, str(target), env)
    finally:
        os.close(fd)
    m = Mounted(target, config, proc, log)
    if line != "ready":
        m.unmount()
        raise RuntimeError(f"objfs serve did not get ready: {line!r}\n{m.log_text()}")
    raise_readahead(str(target), config.tuning.readahead_kb)  # after INIT, as objfs mount does
    return m
