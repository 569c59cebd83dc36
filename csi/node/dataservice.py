"""The node plugin's side of the data service (``fusefs.proc.dataservice``, started and driven through
``fusefs.proc.service_process.ServiceProcess``): its uid and cache, the read-only mirror of the cache,
and the grants' records, so that a restarted plugin can hand every live server a new connection.

The service runs as ``--data-uid`` (a uid of its own, owner of the node cache, no capabilities);
the plugin keeps the privileged parts: the read-only bind mount of the cache through which complete
files are registered for passthrough, and the broker that registers them (``csi/node/broker.py``).

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

from cryptography.fernet import Fernet, InvalidToken

from csi.node.state import remove_temp_files, write_atomically
from fusefs import kernel
from fusefs.config import Credentials, MountConfig

log = logging.getLogger(__name__)

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
        write_atomically(self._path(target), json.dumps(record).encode())

    def remove_leftovers(self) -> None:
        """Delete temp files of records an earlier life did not finish writing (only the plugin, at
        start): they hold credentials (encrypted) that no volume needs."""
        remove_temp_files(self.dir)

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


def metrics_path(state_dir: str) -> str:
    return os.path.join(state_dir, "data", "metrics.prom")


def prepare_own_dir(state_dir: str, uid: int, gid: int) -> str:
    """``<state>/data``: the data service's own (its figures), 0700, read by the plugin (root)."""
    path = os.path.join(state_dir, "data")
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, uid, gid)
    os.chmod(path, 0o700)
    return path


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
