"""Reaching into a pod's emptyDir from the node plugin without trusting what the pod put there.

A pod's containers can write its emptyDir (``objfs-tmp``): they can plant a symlink where the plugin
expects its hand-over socket or a metrics file, and ``connect()``/``open()`` on a path follow a symlink
in any component, into another pod's directory or anywhere on the node. So the directory is opened
one component at a time with ``O_NOFOLLOW`` from kubelet's root (which is the node's own and may be a
symlink), and files in it are opened relative to that fd, again with ``O_NOFOLLOW``, and checked by
``fstat`` before use. A socket is then reached through ``/proc/self/fd/N``: the kernel resolves that
magic link to the very inode checked, not to a path the pod could swap in between.
"""

from __future__ import annotations

import errno
import os
import re
import select
import socket
import stat
import struct

EMPTY_DIR_PLUGIN = "kubernetes.io~empty-dir"
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux >= 6.5; Python 3.11 has no constant
_KINDS = {stat.S_IFSOCK: "socket", stat.S_IFREG: "regular file", stat.S_IFDIR: "directory"}


def pod_dir_parts(pod_uid: str, volume: str) -> tuple[str, ...]:
    """The components of a pod's emptyDir below kubelet's root."""
    return ("pods", pod_uid, "volumes", EMPTY_DIR_PLUGIN, volume)


def open_dir_beneath(root: str, parts: tuple[str, ...] | list[str]) -> int:
    """An O_PATH fd of ``root/parts...``; OSError if any of ``parts`` is a symlink (ELOOP/ENOTDIR), is not
    a directory, or is not a single plain name (``..``, ``/``)."""
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            if part in ("", ".", "..") or "/" in part or "\0" in part:
                raise OSError(errno.EINVAL, f"not a plain name: {part!r}")
            # O_PATH|O_NOFOLLOW alone would open a symlink itself; O_DIRECTORY makes that ENOTDIR.
            child = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file_at(dir_fd: int, name: str, kind: int, flags: int = os.O_PATH) -> int:
    """``name`` in ``dir_fd`` opened with O_NOFOLLOW (a symlink is opened as itself, then refused), if
    it is of ``kind`` (``stat.S_IFSOCK``, ``stat.S_IFREG``, ...); OSError otherwise."""
    if name in ("", ".", "..") or "/" in name:
        raise OSError(errno.EINVAL, f"not a plain name: {name!r}")
    # O_NONBLOCK: opening a FIFO planted under the name must not wait for a writer.
    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    try:
        if stat.S_IFMT(os.fstat(fd).st_mode) != kind:
            raise OSError(errno.EPERM, f"{name} is not a {_KINDS.get(kind, 'file of the expected type')}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def connect_in_pod(kubelet_root: str, parts: tuple[str, ...], name: str, sock_type: int,
                   timeout: float) -> socket.socket:
    """A unix socket connected to the socket file ``name`` in ``kubelet_root/parts...``, following no
    symlink below kubelet's root; OSError if it is missing, not a socket, or nobody listens."""
    dir_fd = open_dir_beneath(kubelet_root, parts)
    try:
        sock_fd = open_file_at(dir_fd, name, stat.S_IFSOCK)
    finally:
        os.close(dir_fd)
    sock = socket.socket(socket.AF_UNIX, sock_type | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        # Also keeps under a socket path's 108 bytes, which kubelet's paths can exceed.
        sock.connect(f"/proc/self/fd/{sock_fd}")
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(sock_fd)
    return sock


# -- the peer ------------------------------------------------------------------------------------------
def _peer_pidfd(sock: socket.socket) -> int | None:
    """A pidfd of the process that connected/listened (SO_PEERPIDFD: no pid reuse race), or None."""
    try:
        return struct.unpack("i", sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]  # type: ignore[no-any-return]
    except OSError:
        return None


def _pidfd_pid(pidfd: int) -> int:
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])  # 0: not in our PID namespace; -1: exited
    return 0


def _cgroup_names_pod(text: str, pod_uid: str) -> bool:
    """Whether a /proc/<pid>/cgroup text puts the process in the pod's cgroup: ``.../pod<uid>/...``
    (cgroupfs driver) or ``...-pod<uid with underscores>.slice/...`` (systemd driver)."""
    if not re.fullmatch(r"[0-9a-fA-F-]{1,64}", pod_uid):
        return False
    forms = "|".join(re.escape(u) for u in {pod_uid, pod_uid.replace("-", "_")})
    return re.search(rf"(?:^|[/-])pod(?:{forms})(?:\.slice)?(?:/|$)", text, re.MULTILINE) is not None


def peer_in_pod(sock: socket.socket, pod_uid: str, proc: str = "/proc") -> bool:
    """Whether the process at the other end of ``sock`` runs in the pod's cgroup. False when it cannot
    be told (a PID namespace that hides the peer, or it exited)."""
    pidfd = _peer_pidfd(sock)
    try:
        if pidfd is not None:
            pid = _pidfd_pid(pidfd)
        else:  # an older kernel: the pid may be reused before we read it, the pidfd below narrows that
            pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
            pidfd = os.pidfd_open(pid) if pid > 0 else None
        if pid <= 0 or pidfd is None:
            return False
        with open(os.path.join(proc, str(pid), "cgroup")) as f:
            text = f.read(64 * 1024)
        # Read after the pidfd was taken: if the peer is still alive now, the pid was not reused.
        still_alive = not select.select([pidfd], [], [], 0)[0]
        return still_alive and _cgroup_names_pod(text, pod_uid)
    except (OSError, ValueError):
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)
