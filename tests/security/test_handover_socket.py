"""Attacks on the node plugin's connect to a pod's hand-over socket (``SidecarLauncher._connect``): the
pod's emptyDir is the tenant's to write, so what the plugin finds there is planted, not trusted."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.node import podpath
from csi.node.launcher import EMPTY_DIR_NAME, SidecarLauncher
from fusefs.wire.handoff import SIDECAR_SOCKET

VICTIM, ATTACKER = "11111111-2222-3333-4444-555555555555", "66666666-7777-8888-9999-000000000000"


def pod_dir(root: Path, uid: str) -> Path:
    path = root.joinpath(*podpath.pod_dir_parts(uid, EMPTY_DIR_NAME))
    path.mkdir(parents=True, exist_ok=True)
    return path


def listen_in(directory: Path) -> socket.socket:
    """A sidecar's listener on ``directory``/objfs.sock (bound through a directory fd: the path is long)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    try:
        listener.bind(f"/proc/self/fd/{fd}/{SIDECAR_SOCKET}")
    finally:
        os.close(fd)
    listener.listen(8)
    return listener


@pytest.fixture
def victim_listener(tmp_path: Path) -> Iterator[socket.socket]:
    """Another pod's sidecar, listening on its own hand-over socket."""
    listener = listen_in(pod_dir(tmp_path, VICTIM))
    listener.setblocking(False)
    yield listener
    listener.close()


def assert_no_connection(listener: socket.socket) -> None:
    """Nothing queued on the victim's socket (a unix connect is queued when connect() returns)."""
    with pytest.raises(BlockingIOError):
        listener.accept()[0].close()


def test_symlink_at_the_socket_is_not_followed(tmp_path: Path, victim_listener: socket.socket) -> None:
    """Attack: the pod plants ``objfs.sock -> <another pod's objfs-tmp>/objfs.sock`` in its emptyDir.
    connect() on the path followed it, and the plugin handed this pod's volume (and what came with it)
    to the other pod's sidecar; now the socket file is opened with O_NOFOLLOW and must be a socket."""
    launcher = SidecarLauncher(str(tmp_path))
    os.symlink(pod_dir(tmp_path, VICTIM) / SIDECAR_SOCKET, pod_dir(tmp_path, ATTACKER) / SIDECAR_SOCKET)
    assert launcher._connect(ATTACKER, 5.0) is None
    assert_no_connection(victim_listener)
    # The same link, relative, and a link to a link: not followed either.
    (pod_dir(tmp_path, ATTACKER) / SIDECAR_SOCKET).unlink()
    os.symlink(f"../../../../{VICTIM}/volumes/kubernetes.io~empty-dir/{EMPTY_DIR_NAME}/{SIDECAR_SOCKET}",
               pod_dir(tmp_path, ATTACKER) / SIDECAR_SOCKET)
    assert launcher._connect(ATTACKER, 5.0) is None
    assert_no_connection(victim_listener)
    # Nor is a FIFO planted there opened (a plain open() would wait for a writer): not a socket.
    (pod_dir(tmp_path, ATTACKER) / SIDECAR_SOCKET).unlink()
    os.mkfifo(pod_dir(tmp_path, ATTACKER) / SIDECAR_SOCKET)
    assert launcher._connect(ATTACKER, 5.0) is None
    # The victim's own socket is reached as before.
    sock = launcher._connect(VICTIM, 5.0)
    assert sock is not None
    sock.close()
    victim_listener.accept()[0].close()


def test_symlink_at_a_parent_is_not_followed(tmp_path: Path, victim_listener: socket.socket) -> None:
    """Attack: a symlink at a directory above the socket (the pod's objfs-tmp, or its pod directory)
    pointing at another pod's: connect() followed every component; now each directory below kubelet's
    root is opened with O_NOFOLLOW."""
    launcher = SidecarLauncher(str(tmp_path))
    attacker_tmp = pod_dir(tmp_path, ATTACKER)
    attacker_tmp.rmdir()
    os.symlink(pod_dir(tmp_path, VICTIM), attacker_tmp)
    assert launcher._connect(ATTACKER, 5.0) is None
    assert_no_connection(victim_listener)
    other = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    os.symlink(tmp_path / "pods" / VICTIM, tmp_path / "pods" / other)
    assert launcher._connect(other, 5.0) is None
    assert_no_connection(victim_listener)
    assert launcher._connect("../pods/" + VICTIM, 5.0) is None  # a uid is one plain name
    assert_no_connection(victim_listener)


def test_a_listener_outside_the_pod_is_refused_when_peers_are_checked(tmp_path: Path) -> None:
    """Attack: a process outside the pod's cgroup (here: this test, in no pod) listens on the pod's socket.
    With check_peer_cgroup the plugin refuses it; a peer whose /proc/<pid>/cgroup names the pod (either
    form kubelet uses) passes."""
    listener = listen_in(pod_dir(tmp_path, VICTIM))
    try:
        assert SidecarLauncher(str(tmp_path), check_peer_cgroup=True)._connect(VICTIM, 5.0) is None
        sock = SidecarLauncher(str(tmp_path))._connect(VICTIM, 5.0)  # unchecked: connects
        assert sock is not None
        with sock:
            proc = tmp_path / "proc" / str(os.getpid())
            proc.mkdir(parents=True)
            for cgroup, inside in [
                (f"0::/kubepods/besteffort/pod{VICTIM}/0123abcd\n", True),
                (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{VICTIM.replace('-', '_')}"
                 ".slice/cri-containerd-0123.scope\n", True),
                (f"0::/kubepods/besteffort/pod{ATTACKER}/0123abcd\n", False),
                (f"0::/kubepods/besteffort/pod{VICTIM}0/0123abcd\n", False),
                ("0::/user.slice\n", False),
            ]:
                (proc / "cgroup").write_text(cgroup)
                assert podpath.peer_in_pod(sock, VICTIM, proc=str(tmp_path / "proc")) is inside, cgroup
    finally:
        listener.close()
