"""The privileged kernel side of a FUSE mount: open /dev/fuse, mount(2), umount2(2), readahead.

The CSI node plugin (root) mounts the target itself and hands the /dev/fuse fd to an
unprivileged ``objfs serve``; libfuse accepts ``/dev/fd/N`` as an already-mounted fd. Nothing
here talks to the network or parses untrusted data.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import socket
import stat
import threading
from dataclasses import dataclass

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_FORCE = 1
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount_fuse(
    target: str,
    *,
    fsname: str = "objfs",
    subtype: str = "objfs",
    read_only: bool = False,
    allow_other: bool = False,
    max_read: int = 1024 * 1024,
) -> int:
    """Open /dev/fuse and mount it on ``target``; return the fd (inheritable) to serve.

    The fd belongs to the caller: hand it to the server, then close the caller's copy.
    """
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        opts = [f"fd={fd}", f"rootmode={stat.S_IFDIR:o}", "user_id=0", "group_id=0", f"max_read={max_read}"]
        if allow_other:
            opts.append("allow_other")
        flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0)
        rc = _libc.mount(
            fsname.encode(), target.encode(), f"fuse.{subtype}".encode(), flags, ",".join(opts).encode()
        )
        if rc != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"mount of {target} failed: {os.strerror(e)}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def unmount(target: str, *, lazy: bool = False) -> None:
    """umount2(target). ``lazy`` detaches a mount whose server is gone or busy."""
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)
    if _libc.umount2(target.encode(), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"unmount of {target} failed: {os.strerror(e)}")


MS_REMOUNT = 32
MS_BIND = 4096


def bind_readonly(source: str, target: str) -> None:
    """A read-only bind mount of ``source`` at ``target`` (root only): nothing opened through it
    can be written, whatever the opener's credentials (EROFS)."""
    if _libc.mount(source.encode(), target.encode(), None, MS_BIND, None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"bind mount of {source} at {target} failed: {os.strerror(e)}")
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
    if _libc.mount(b"none", target.encode(), None, flags, None) != 0:
        e = ctypes.get_errno()
        with contextlib.suppress(OSError):
            unmount(target, lazy=True)
        raise OSError(e, f"making {target} read-only failed: {os.strerror(e)}")


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    major_minor: str
    root: str
    mount_point: str
    options: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    entries = []
    with open(path) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            a = left.split()
            b = right.split()
            if len(a) < 6 or len(b) < 2:
                continue
            entries.append(MountEntry(int(a[0]), a[2], _unescape(a[3]), _unescape(a[4]), a[5], b[0],
                                      _unescape(b[1])))
    return entries


def find_mount(target: str) -> MountEntry | None:
    """The topmost mount whose mount point is exactly ``target``."""
    # Never stat or realpath the target: a FUSE mount whose server is gone (or not yet
    # started) would block the caller until the connection is aborted.
    target = os.path.normpath(os.path.abspath(target))
    found = None
    for m in mounts():
        if m.mount_point == target:
            found = m
    return found


def set_readahead(target: str, kb: int) -> bool:
    """Raise the kernel readahead of a FUSE mount (its bdi) so buffered reads arrive as large
    requests. Needs root; returns False where the knob is not writable."""
    m = find_mount(target)
    if m is None:
        return False
    path = f"/sys/class/bdi/{m.major_minor}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
        return True
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.ENOENT, errno.EROFS):
            return False
        raise


def raise_readahead(target: str, kb: int) -> bool:
    """Raise the mount's kernel readahead to ``kb`` (root only), once FUSE INIT was answered: the
    kernel caps readahead at the INIT reply's value (128 KiB) when that reply arrives, so a value
    set before it is lost. A stat of the mount waits for INIT, so this blocks until the server
    serves: call it from a thread (``raise_readahead_soon``) unless the server surely does."""
    try:
        os.stat(target)
    except OSError:
        return False
    return set_readahead(target, kb)


def raise_readahead_soon(target: str, kb: int) -> None:
    """``raise_readahead`` in a thread of its own: the one way every launcher raises it (the server
    answers the stat in milliseconds, or the thread just waits)."""
    if kb <= 0:
        return

    def run() -> None:
        with contextlib.suppress(OSError):
            raise_readahead(target, kb)

    threading.Thread(target=run, name=f"readahead {target}", daemon=True).start()


# -- the process at the other end of a unix socket ---------------------------------------------
SO_PEERPIDFD = 77  # Linux >= 6.5: a pidfd of the peer, valid across PID namespaces


def peer_pidfd(sock: socket.socket) -> int | None:
    """A pidfd of the process at the other end of a connected unix socket, or None (old kernel)."""
    try:
        return int(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
    except OSError:
        return None
