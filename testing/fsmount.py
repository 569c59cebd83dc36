"""Test helper: a real objfs FUSE mount served by ``objfs serve`` on an fd we mounted ourselves
(the same path the CSI node plugin takes), cleaned up with a lazy unmount."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fusefs import kernel
from fusefs.config import MountConfig
from fusefs.proc.spawn import ServePipes, serve_command

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
    if fuse_fd is not None:
        os.set_inheritable(fuse_fd, True)
    pipes = ServePipes()
    cmd, fds = serve_command([sys.executable, "-m", "fusefs.proc.cli"], pipes.config_r, pipes.ready_w,
                             fuse_fd=fuse_fd, mountpoint=mountpoint)
    try:
        with open(log, "ab") as logf:
            proc = subprocess.Popen(cmd, pass_fds=fds, stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=str(Path(__file__).resolve().parent.parent),
                                    env=env)
    except BaseException:
        pipes.close()
        raise
    pipes.started()
    return proc, pipes.hand_over(config, READY_TIMEOUT) or ""


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
    kernel.raise_readahead(str(target), config.tuning.readahead_kb)  # after INIT, as objfs mount does
    return m
