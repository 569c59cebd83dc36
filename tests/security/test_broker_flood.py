"""Flooding the passthrough broker with connections that never say anything.

The broker used to serve one connection at a time and read before it looked at who was calling:
three idle connections stalled every passthrough open on the node for 15 s. Now it checks the
peer's uid before reading anything (only root and the data service's uid are served) and serves
connections side by side. Twenty idle connections of another uid (the servers' 65534) are turned
away at once, and a real request behind them is answered.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.node.broker import Broker
from fusefs.passthrough.broker import BrokerClient
from testing.pods import SYSTEM_PYTHON, wait_for

pytestmark = pytest.mark.fuse
IDLE = 20

HOLDER = r"""
import socket, sys, time
held = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    held.append(s)
print("connected", flush=True)
time.sleep(120)
"""


@pytest.fixture
def broker() -> Iterator[tuple[Broker, Path]]:
    root = Path(tempfile.mkdtemp(prefix="objfs-broker-"))
    os.chmod(root, 0o755)  # the flooding uid must reach the socket, as a server once could
    objects = root / "cache" / "objects" / "ab"
    objects.mkdir(parents=True)
    b = Broker(str(root / "broker"), str(root / "cache"), client_uid=65532)
    try:
        yield b, objects
    finally:
        b.close()
        shutil.rmtree(root, ignore_errors=True)


def test_idle_connections_of_other_uids_do_not_stall_the_broker(broker: tuple[Broker, Path]) -> None:
    b, objects = broker
    holder = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SYSTEM_PYTHON,
                               "-I", "-S", "-c", HOLDER, b.path, str(IDLE)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"connected"
        partial = objects / "p.part"
        partial.write_bytes(b"x" * 4096)
        fuse_fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        file_fd = os.open(partial, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with pytest.raises(OSError) as answered:  # BrokerClient gives up after 10 s without an answer
                BrokerClient(b.path).open(fuse_fd, file_fd)
            assert answered.value.errno == errno.EACCES  # answered: not a complete cache file
        finally:
            os.close(fuse_fd)
            os.close(file_fd)
        # every idle connection of the wrong uid is turned away without being read (and our request)
        wait_for(lambda: b.refused == IDLE + 1, what="the broker to refuse every idle connection")
    finally:
        holder.kill()
        holder.wait()
