"""The node plugin's passthrough broker: registers node-cache files as FUSE backing files for the
node's data service.

FUSE_DEV_IOC_BACKING_OPEN needs CAP_SYS_ADMIN in the initial user namespace, which the data service
(a uid of its own, no capabilities: ``fusefs.proc.dataservice``) does not have. It sends the /dev/fuse
fd a pod's server gave it and an fd of the complete cache file to pass through over a unix socket
(SCM_RIGHTS); the broker checks both, registers the file on that connection and answers the backing
id. It keeps no fd: the kernel holds the backing file from the ioctl on, and both received fds are
closed before the answer. Pods never reach this socket (it lives in the plugin's state directory).

What is checked, so that the socket lends no more than the service could read itself:
- the peer runs as root or as the data service's uid (SO_PEERCRED, before anything is read);
- the FUSE fd is /dev/fuse (character device 10:229);
- the file fd is open read-only, on a regular file without write bits, named ``*.obj`` under
  ``<mirror>/objects/`` — the read-only mount of the cache: the kernel reopens a backing file with
  the open flags a pod's server answers with, and on a read-only mount a write open fails (EROFS)
  whoever registered it — and is still the file at that path (a complete file is never rewritten:
  ``fusefs.nodecache.objectfiles``).

Connections are served concurrently (at most ``WORKERS`` at once; more wait in the backlog), and
one that does not send its request within ``TIMEOUT`` seconds is dropped.

The messages, and the client of the data service, are in ``fusefs.passthrough.broker``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
import struct
import threading

from fusefs.passthrough import broker as wire
from fusefs.passthrough.backing import SelfRegistrar

log = logging.getLogger(__name__)

SOCKET_NAME = "broker.sock"
WORKERS = 8
TIMEOUT = 5.0
FUSE_DEVICE = os.makedev(10, 229)


class Refused(Exception):
    """A request the broker does not carry out; ``code`` is the errno answered."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


class Broker:
    """Serves ``<directory>/broker.sock`` in a thread until ``close()``."""

    def __init__(self, directory: str, cache_dir: str, client_uid: int) -> None:
        self.directory = directory
        self.path = os.path.join(directory, SOCKET_NAME)
        self.objects = os.path.join(os.path.realpath(cache_dir), "objects") + os.sep
        self.allowed_uids = {0, client_uid}
        self._slots = threading.BoundedSemaphore(WORKERS)
        self.registrar = SelfRegistrar()
        self.registered = 0
        self.refused = 0
        os.makedirs(directory, mode=0o711, exist_ok=True)
        os.chmod(directory, 0o711)  # servers connect by name; they may not list or create here
        try:
            os.unlink(self.path)  # a socket left by an earlier plugin
        except FileNotFoundError:
            pass
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.bind(self.path)
        os.chmod(self.path, 0o666)  # who may use it is checked per connection (SO_PEERCRED)
        self._sock.listen(64)
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="passthrough-broker", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(5)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _serve(self) -> None:
        while not self._closed:
            self._slots.acquire()  # at most WORKERS connections at once; the rest wait in the backlog
            try:
                conn, _ = self._sock.accept()
            except OSError:
                self._slots.release()
                return
            threading.Thread(target=self._answer, args=(conn,), name="passthrough-broker-conn", daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(TIMEOUT)
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                _pid, uid, _gid = struct.unpack("3i", creds)
                if uid not in self.allowed_uids:  # before reading anything from it
                    self.refused += 1
                    log.warning("passthrough broker: refused a connection of uid %d", uid)
                    return
                try:
                    answer = self._handle(conn)
                except Refused as exc:
                    self.refused += 1
                    log.warning("passthrough broker refused a request: %s", exc)
                    answer = -exc.code
                except OSError as exc:
                    self.refused += 1
                    log.warning("passthrough broker: %s", exc)
                    answer = -(exc.errno or errno.EIO)
                with contextlib.suppress(OSError):
                    conn.sendall(wire.encode_answer(answer))
        finally:
            self._slots.release()

    def _handle(self, conn: socket.socket) -> int:
        msg, fds, _flags, _addr = socket.recv_fds(conn, wire.REQUEST_SIZE, wire.MAX_FDS)
        try:
            request = wire.decode_request(msg, len(fds))
            if request is None:
                raise Refused(errno.EINVAL, "malformed request")
            if request.op == wire.OPEN:
                fuse_fd, file_fd = fds
                self._check_fuse(fuse_fd)
                self._check_file(file_fd)
                backing_id = self.registrar.open(fuse_fd, file_fd)
                self.registered += 1
                return backing_id
            self._check_fuse(fds[0])
            self.registrar.close(fds[0], request.backing_id)
            return 0
        finally:
            for fd in fds:
                os.close(fd)

    def _check_fuse(self, fd: int) -> None:
        st = os.fstat(fd)
        if not stat.S_ISCHR(st.st_mode) or st.st_rdev != FUSE_DEVICE:
            raise Refused(errno.EINVAL, "the first fd is not /dev/fuse")

    def _check_file(self, fd: int) -> None:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
            raise Refused(errno.EACCES, "the file is not open read-only")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o222:
            raise Refused(errno.EACCES, "not a regular file without write bits")
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.endswith(" (deleted)"):
            raise Refused(errno.ESTALE, f"{path}: evicted or replaced")
        if not (path.startswith(self.objects) and path.endswith(".obj")):
            raise Refused(errno.EACCES, f"{path} is not a complete file of the node cache")
        try:
            now = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            raise Refused(errno.ESTALE, f"{path} was removed") from None
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise Refused(errno.ESTALE, f"{path} is no longer the file sent")


def start(directory: str, mirror: str, client_uid: int) -> Broker | None:
    """The broker for this node plugin, or None (passthrough off), said once."""
    try:
        return Broker(directory, mirror, client_uid)
    except OSError as exc:
        log.warning("passthrough broker not started (%s): FUSE passthrough off", exc)
        return None
