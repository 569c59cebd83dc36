"""FUSE passthrough for the server: whether it is available, and registering backing files.

A read-only open of an object whose complete file is in the node cache (``fusefs.nodecache.objectfiles``) is
answered with a backing id: the kernel then reads that local file itself, with its page cache
shared by every mount on the node, and no READ reaches this server. Registering a backing file
(ioctl FUSE_DEV_IOC_BACKING_OPEN on the /dev/fuse fd) needs CAP_SYS_ADMIN, and only the data
service (``fusefs.service``) asks for it: in a standalone ``objfs mount`` as root it does it itself;
the node's data service, unprivileged, asks the node plugin's broker (``csi/node/broker.py``) with the
sidecar's /dev/fuse fd and an fd of the complete file opened through a read-only mount of the
cache (the kernel reopens a backing file with the user's open flags: the read-only mount makes a
write open fail, EROFS, whatever the pod's server answers).

Needs the patched pyfuse3 (``native/``: ``FileInfo.backing_id``, the ``passthrough`` init option,
``passthrough_supported()``, ``fuse_fd()``) built against libfuse >= 3.17.3, a kernel >= 6.9 and
the privilege. Without one of them the server reads through itself as before and says so once.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from typing import Any, Protocol

import pyfuse3

log = logging.getLogger(__name__)

#: ioctls on the /dev/fuse fd (linux/fuse.h): struct fuse_backing_map {i32 fd; u32 flags; u64 padding}
FUSE_DEV_IOC_BACKING_OPEN = 0x4010E501
FUSE_DEV_IOC_BACKING_CLOSE = 0x4004E502


class Registrar(Protocol):
    """Registers backing files with the kernel for one FUSE connection (blocking calls)."""

    def open(self, fuse_fd: int, file_fd: int) -> int: ...
    def close(self, fuse_fd: int, backing_id: int) -> None: ...


class SelfRegistrar:
    """The server has CAP_SYS_ADMIN (``objfs mount`` as root): the ioctls directly."""

    def open(self, fuse_fd: int, file_fd: int) -> int:
        arg = bytearray(struct.pack("=iIQ", file_fd, 0, 0))
        backing_id = fcntl.ioctl(fuse_fd, FUSE_DEV_IOC_BACKING_OPEN, arg)
        if backing_id <= 0:
            raise OSError(errno.EIO, "FUSE_DEV_IOC_BACKING_OPEN returned no id")
        return backing_id

    def close(self, fuse_fd: int, backing_id: int) -> None:
        fcntl.ioctl(fuse_fd, FUSE_DEV_IOC_BACKING_CLOSE, bytearray(struct.pack("=I", backing_id)))


def patched_pyfuse3() -> bool:
    """Whether this pyfuse3 has the passthrough API (helper build in the Makefile)."""
    return all(hasattr(pyfuse3, name) for name in ("passthrough_supported", "fuse_fd")) and hasattr(
        pyfuse3.FileInfo, "backing_id")


def broker_registrar(socket_path: str) -> Registrar:
    """The node plugin's broker (``csi/node/broker.py``) through its client (``fusefs.passthrough.broker``)."""
    from fusefs.passthrough.broker import BrokerClient

    return BrokerClient(socket_path)


def choose_registrar(broker_socket: str) -> tuple[Registrar | None, str]:
    """Who registers backing files for the data service, or None with the reason."""
    if broker_socket:
        return broker_registrar(broker_socket), f"backing files registered by the broker at {broker_socket}"
    if os.geteuid() != 0:
        return None, "not root and no broker socket configured"
    return SelfRegistrar(), "backing files registered by this process (root)"


class Passthrough:
    """The FUSE server's side of passthrough: whether INIT negotiated it. The backing files
    themselves are registered by the data service (``fusefs.service``), never by this side."""

    def __init__(self, how: str) -> None:
        self.how = how
        self._negotiated: bool | None = None

    def available(self) -> bool:
        """Whether INIT negotiated passthrough (known from the first open on; logged once)."""
        if self._negotiated is None:
            self._negotiated = bool(pyfuse3.passthrough_supported())  # type: ignore[attr-defined]
            if self._negotiated:
                log.info("FUSE passthrough on: %s", self.how)
            else:
                log.warning("FUSE passthrough off: the kernel or libfuse did not negotiate it; "
                            "reading through the server")
        return self._negotiated


def fuse_fd() -> int | None:
    """This process's mounted /dev/fuse fd once pyfuse3 is initialised (patched build), else None."""
    if not patched_pyfuse3():
        return None
    try:
        return int(pyfuse3.fuse_fd())  # type: ignore[attr-defined]
    except Exception:  # not initialised (yet)
        return None


#: whether this pyfuse3 can ask the kernel to send no FLUSH at close (the patch of ``native/``)
NOFLUSH = hasattr(pyfuse3.FileInfo(), "noflush")


def file_info(fh: int, backing_id: int, keep_cache: bool, direct_io: bool, noflush: bool = False) -> Any:
    """pyfuse3.FileInfo for an open; with a backing id: passthrough, never keep_cache (EIO).
    ``noflush``: an open with nothing to flush at close (read-only): the kernel sends no FLUSH
    for it (FOPEN_NOFLUSH), one request less per file a reader opens and closes."""
    fi = pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache and not backing_id, direct_io=direct_io and not backing_id)
    if backing_id:
        fi.backing_id = backing_id  # type: ignore[attr-defined]
    if noflush and NOFLUSH:
        fi.noflush = True  # type: ignore[attr-defined]
    return fi
