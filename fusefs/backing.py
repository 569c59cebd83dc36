"""FUSE passthrough for the server: whether it is available, and registering backing files.

A read-only open of an object whose complete file is in the node cache (``fusefs.objects``) is
answered with a backing id: the kernel then reads that local file itself, with its page cache
shared by every mount on the node, and no READ reaches this server. Registering a backing file
(ioctl FUSE_DEV_IOC_BACKING_OPEN on the /dev/fuse fd) needs CAP_SYS_ADMIN: a server running as root
(``objfs mount``) does it itself; an unprivileged one asks the node plugin's broker
(``MountConfig.broker_socket``, see ``csi/broker.py``), passing both fds.

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
import trio

from . import metrics

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
    """The node plugin's broker (``csi/broker.py``) through its client (``fusefs.passthrough``)."""
    from .passthrough import BrokerClient

    return BrokerClient(socket_path)


def choose_registrar(broker_socket: str) -> tuple[Registrar | None, str]:
    """Who registers backing files, or None with the reason."""
    if not patched_pyfuse3():
        return None, "this pyfuse3 has no passthrough API (needs the patched build against libfuse >= 3.17)"
    if broker_socket:
        return broker_registrar(broker_socket), f"backing files registered by the broker at {broker_socket}"
    if os.geteuid() != 0:
        return None, "not root and no broker socket configured"
    return SelfRegistrar(), "backing files registered by this server (root)"


class Passthrough:
    """Backing ids for one mount: registers complete cache files, closes ids no open uses."""

    def __init__(self, registrar: Registrar, how: str) -> None:
        self.registrar = registrar
        self.how = how
        self.failed = 0
        self._reported = False
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

    def _fuse_fd(self) -> int:
        return int(pyfuse3.fuse_fd())  # type: ignore[attr-defined]

    def _register(self, path: str, size: int) -> int:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            # a complete file is a regular, read-only file of the object's size (fusefs.objects)
            if not (st.st_mode & 0o170000 == 0o100000 and st.st_size == size and not st.st_mode & 0o222):
                raise OSError(errno.EINVAL, f"{path} is not a complete cache file")
            return self.registrar.open(self._fuse_fd(), fd)
        finally:
            os.close(fd)  # the kernel holds its own reference from here on

    async def register(self, path: str, size: int) -> int:
        """A backing id for the complete file ``path``, or 0 (the open then goes through the server)."""
        try:
            return await trio.to_thread.run_sync(self._register, path, size)
        except OSError as exc:
            self.failed += 1
            metrics.PASSTHROUGH_REFUSED.inc()
            level = logging.DEBUG if self._reported else logging.WARNING
            self._reported = True
            log.log(level, "passthrough open of %s refused (%s); reading through the server", path, exc)
            return 0

    async def close(self, backing_id: int) -> None:
        try:
            await trio.to_thread.run_sync(self.registrar.close, self._fuse_fd(), backing_id)
        except OSError as exc:
            log.debug("closing backing id %d: %s", backing_id, exc)


def file_info(fh: int, backing_id: int, keep_cache: bool, direct_io: bool) -> Any:
    """pyfuse3.FileInfo for an open; with a backing id: passthrough, never keep_cache (EIO)."""
    fi = pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache and not backing_id, direct_io=direct_io and not backing_id)
    if backing_id:
        fi.backing_id = backing_id  # type: ignore[attr-defined]
    return fi
