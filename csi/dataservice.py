"""The node plugin's side of the data service (``fusefs.service.daemon``): start it, grant, revoke,
and keep the grants' configs so that a restarted plugin can hand every live server a new
connection.

The service runs as ``--data-uid`` (a uid of its own, owner of the node cache, no capabilities);
the plugin keeps the privileged parts: the read-only bind mount of the cache through which complete
files are registered for passthrough, and the broker that registers them (``csi/broker.py``).

Grant records at rest (``<state>/grants/``, root-only, like every record) hold the volume's
configuration with its credentials encrypted (Fernet) under a key that lives only in memory-backed
storage (``--grant-key-file``, by default under /run: tmpfs, gone at reboot, when no mount survives
either). A copy of the state directory alone, or a disk image of the node, holds no usable secret.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence

from cryptography.fernet import Fernet, InvalidToken

from fusefs import kernel
from fusefs.config import Credentials, MountConfig
from fusefs.wire.control import ControlError, ServiceLink

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0


def grant_id(target: str) -> str:
    return hashlib.sha256(target.encode()).hexdigest()[:32]


class GrantRecords:
    """The configs of live grants, credentials encrypted, one file per target."""

    def __init__(self, state_dir: str, key_file: str) -> None:
        self.dir = os.path.join(state_dir, "grants")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.fernet = Fernet(self._key(key_file))

    @staticmethod
    def _key(path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                key = f.read().strip()
            Fernet(key)
            return key
        except (FileNotFoundError, ValueError):
            pass
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        key = Fernet.generate_key()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key

    def _path(self, target: str) -> str:
        return os.path.join(self.dir, grant_id(target) + ".json")

    def put(self, target: str, config: MountConfig) -> None:
        creds = json.dumps(dataclasses.asdict(config.credentials)).encode()
        bare = dataclasses.replace(config, credentials=Credentials())
        record = {"target": target, "config": json.loads(bare.to_json()),
                  "credentials": self.fernet.encrypt(creds).decode()}
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-")
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, json.dumps(record).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self._path(target))

    def get(self, target: str) -> MountConfig | None:
        try:
            with open(self._path(target), "rb") as f:
                record = json.loads(f.read())
            if record.get("target") != target:
                return None
            creds = json.loads(self.fernet.decrypt(record["credentials"].encode()))
            config = MountConfig.from_json(json.dumps(record["config"]))
            return dataclasses.replace(config, credentials=Credentials(**creds))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, InvalidToken) as exc:
            log.warning("grant record of %s unreadable (%s): its server cannot get a new connection", target,
                        type(exc).__name__)
            return None

    def delete(self, target: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(target))


def prepare_cache(cache_dir: str, uid: int, gid: int) -> None:
    """The node cache belongs to the data service's uid alone (0700). A cache left by a version
    whose servers owned it is handed over once (its files keep their contents)."""
    os.makedirs(cache_dir, mode=0o700, exist_ok=True)
    if os.geteuid() == 0 and os.stat(cache_dir).st_uid != uid:
        for root, dirs, files in os.walk(cache_dir):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)
        os.chown(cache_dir, uid, gid)
    os.chmod(cache_dir, 0o700)


def readonly_mirror(cache_dir: str, mirror: str) -> str | None:
    """A read-only bind mount of the cache at ``mirror`` (root only): complete files are registered
    for passthrough through it, so the kernel cannot reopen them for writing. None if impossible."""
    if os.geteuid() != 0:
        return None
    os.makedirs(mirror, mode=0o700, exist_ok=True)
    existing = kernel.find_mount(mirror)
    if existing is not None and "ro" in existing.options.split(","):
        return mirror
    try:
        kernel.bind_readonly(cache_dir, mirror)
    except OSError as exc:
        log.warning("no read-only mount of the node cache (%s): FUSE passthrough off", exc.strerror)
        return None
    return mirror


class DataService:
    """The data service process and its control link; restarted on demand if it died."""

    def __init__(self, command: Sequence[str], cache_dir: str | None, cache_size: int, *,
                 backing_root: str | None = None, broker_socket: str = "", log_path: str = "") -> None:
        self.command = list(command)  # privilege drop + the objfs command
        self.cache_dir = cache_dir
        self.cache_size = cache_size
        self.backing_root = backing_root
        self.broker_socket = broker_socket
        self.log_path = log_path
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._link: ServiceLink | None = None
        self.generation = 0  # bumped on every (re)start: grants of an older one must be handed out again
        self._closing = threading.Event()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> ServiceLink:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [*self.command, "data-service", "--control-fd", str(theirs.fileno())]
        if self.cache_dir and self.cache_size > 0:
            argv += ["--cache-dir", self.cache_dir, "--cache-size", str(self.cache_size)]
            if self.backing_root and self.broker_socket:
                argv += ["--backing-root", self.backing_root, "--broker-socket", self.broker_socket]
        out: int | None = None
        if self.log_path:
            out = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            # The environment is ours minus nothing secret (the plugin has no secrets in it);
            # credentials only ever travel over the control link.
            self._proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), cwd="/", stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=out, env=_env())
        finally:
            theirs.close()
            if out is not None:
                os.close(out)
        link = ServiceLink(ours, READY_TIMEOUT)
        link.ping()  # answered once the service is up
        self.generation += 1
        log.info("data service started (pid %d)", self._proc.pid)
        return link

    def link(self) -> ServiceLink:
        with self._lock:
            if self._link is None or self._proc is None or self._proc.poll() is not None:
                if self._proc is not None and self._proc.poll() is not None:
                    log.error("the data service exited (%s): starting it again", self._proc.returncode)
                if self._link is not None:
                    self._link.close()
                self._link = self._start()
            return self._link

    def grant(self, target: str, config: MountConfig) -> socket.socket:
        """A connection served for ``target``'s grant; ControlError if the service refused it."""
        try:
            return self.link().grant(grant_id(target), config)
        except ControlError:
            raise
        except OSError as exc:
            raise ControlError(f"the node's data service cannot be started: {exc}") from None

    def watch(self, restarted: Callable[[], None]) -> None:
        """Start the service now, and again whenever it exits while the plugin runs; after each
        restart ``restarted`` hands the live servers their new grant connections."""
        def run() -> None:
            while not self._closing.is_set():
                try:
                    self.link()
                except (ControlError, OSError) as exc:
                    log.error("the data service does not start: %s; trying again", exc)
                    self._closing.wait(5)
                    continue
                proc = self._proc
                assert proc is not None
                generation = self.generation
                proc.wait()
                if self._closing.is_set():
                    return
                log.error("the data service exited (%s): restarting it", proc.returncode)
                self.link()
                if self.generation != generation:
                    restarted()

        threading.Thread(target=run, name="data-service-watch", daemon=True).start()

    def revoke(self, target: str) -> None:
        with self._lock:
            link = self._link
        if link is None:
            return
        try:
            link.revoke(grant_id(target))
        except ControlError as exc:
            log.warning("revoking the grant of %s: %s", target, exc)

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            if self._link is not None:
                self._link.close()  # the service exits when its link closes
            if self._proc is not None:
                try:
                    self._proc.wait(10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()


def _env() -> dict[str, str]:
    path = os.path.dirname(sys.executable) + os.pathsep + os.defpath
    env = {"PATH": path, "LANG": "C.UTF-8", "HOME": "/", "PYTHONUNBUFFERED": "1"}
    if "OBJFS_LOG_LEVEL" in os.environ:
        env["OBJFS_LOG_LEVEL"] = os.environ["OBJFS_LOG_LEVEL"]
    return env


def command_for(uid: int, gid: int, objfs: Sequence[str]) -> list[str]:
    """``objfs`` as ``uid``: no groups, no capabilities, no way back (like the servers)."""
    if os.geteuid() != 0 or uid == 0:
        return list(objfs)
    setpriv = shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if setpriv is None:
        raise ControlError("setpriv (util-linux) is needed to run the data service as an unprivileged uid")
    return [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--inh-caps=-all", "--no-new-privs",
            "--", *objfs]
