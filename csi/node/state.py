"""The node plugin's state on disk: one record per published target.

A record says which ``objfs serve`` process (pid + start time, so a reused pid is not mistaken
for our server) or which pod's sidecar serves which target, so that a restarted plugin — even
after kill -9 — can unpublish mounts it did not create in this life. The record is written
before anything is mounted (phase ``mounting``), so a crash at any point of a publish leaves a
record that tells the next plugin what to finish or undo. Records never hold secrets. Writes
are atomic (temp file, fsync, rename, fsync of the directory) and the files are 0600.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from csi.errors import Aborted

log = logging.getLogger(__name__)


#: phases of a publish: intent recorded (nothing or a half-done mount: undo it); mounted and
#: waiting for the pod's sidecar to take the fd; served; the hand-over failed (message says why)
MOUNTING, PENDING, SERVED, FAILED = "mounting", "pending", "served", "failed"
PROCESS, SIDECAR = "process", "sidecar"


@dataclass(frozen=True)
class PublishRecord:
    volume_id: str
    target: str
    pid: int
    start_time: int  # /proc/<pid>/stat field 22: tells a reused pid from our server
    read_only: bool
    fingerprint: str  # hash of the publish request without secrets: tells repeats from conflicts
    config: dict[str, Any] = field(default_factory=dict)  # MountConfig.redacted()
    log_path: str = ""
    phase: str = SERVED
    launcher: str = PROCESS
    pod_uid: str = ""  # sidecar: whose emptyDir holds the hand-over socket
    pod_namespace: str = ""  # sidecar: the pod (to tell when its containers are done: csi.node.podexit)
    pod_name: str = ""
    name: str = ""  # sidecar: the volume's name in that pod
    message: str = ""  # why the hand-over failed


class StateStore:
    def __init__(self, root: str) -> None:
        self.dir = os.path.join(root, "targets")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)
        # search only: the servers reach <root>/metrics, the data service <root>/broker; the
        # records (targets/, grants/) stay 0700
        os.chmod(root, 0o711)
        stale = os.path.join(root, "pending")  # an earlier version kept secrets there: never again
        if os.path.isdir(stale):
            shutil.rmtree(stale, ignore_errors=True)

    def remove_leftovers(self) -> None:
        """Delete temp files of writes an earlier life did not finish (only the plugin, at start)."""
        remove_temp_files(self.dir)

    def _path(self, target: str) -> str:
        return os.path.join(self.dir, hashlib.sha256(target.encode()).hexdigest()[:32] + ".json")

    def put(self, rec: PublishRecord) -> None:
        write_atomically(self._path(rec.target), json.dumps(dataclasses.asdict(rec), sort_keys=True).encode())

    def get(self, target: str) -> PublishRecord | None:
        try:
            with open(self._path(target), "rb") as f:
                rec = _load(f.read())
        except FileNotFoundError:
            return None
        return rec if rec is not None and rec.target == target else None

    def delete(self, target: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(target))
            sync_dir(self.dir)

    def all(self) -> list[PublishRecord]:
        out = []
        for name in sorted(os.listdir(self.dir)):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.dir, name), "rb") as f:
                    rec = _load(f.read())
            except OSError:
                continue
            if rec is None:
                log.warning("ignoring unreadable state record %s", name)
                continue
            out.append(rec)
        return out


#: temp files of records being written: a plugin killed mid-write leaves one, removed at its next start
TEMP_PREFIX = ".tmp-"


def write_atomically(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` (0600): the old or the new record survives a crash, never half."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX)
    try:
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    sync_dir(directory)


def remove_temp_files(directory: str) -> None:
    for name in os.listdir(directory):
        if name.startswith(TEMP_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))


def sync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load(data: bytes) -> PublishRecord | None:
    try:
        raw = json.loads(data)
        return PublishRecord(**raw)
    except (ValueError, TypeError):
        return None


class KeyedLocks:
    """One lock per key (volume ID or target path) instead of a global lock around RPCs.

    A second operation on a busy key fails fast with ABORTED (the CSI spec's answer for
    "operation pending"): the CO retries, and no gRPC thread sits waiting on a slow mount.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._held: set[str] = set()

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            if key in self._held:
                raise Aborted(f"an operation on {key} is already in progress: retry later")
            self._held.add(key)
        try:
            yield
        finally:
            with self._guard:
                self._held.discard(key)
