"""Whole-object files of the node cache: one file per object version, filled block by block.

An object larger than one block is cached as a single data file under ``<cache>/objects/``, its
blocks written at their offsets as they are fetched (``<id>-<token>.part``, sparse, 0600). The
node cache's index (diskcache) holds one entry for the file, which carries its size for the LRU
and unlinks it on eviction, and one size-less marker per block (the file's token and the block's
length and CRC-32C). Once every block is there, the whole file is read back and each block checked
against its marker; only then is it made read-only (0400) and renamed to ``<id>-<token>.obj``:
a complete file is never written again, and is what FUSE passthrough serves (``fusefs.passthrough.backing``).

The token (random, per data file) ties markers to the file they were written into: markers left
over from an evicted or discarded file point at a token no file has, and read as misses.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass

from fusefs.config import MountConfig

PARTIAL = ".part"
COMPLETE = ".obj"
SUBDIR = "objects"


@dataclass(frozen=True)
class ObjectId:
    """One version of one object, as one tenant sees it, filled in blocks of ``block_size``."""

    tenant: str
    store: str
    key: str
    version: str
    block_size: int
    size: int

    def encode(self, fmt: str) -> str:
        return json.dumps([fmt, "obj", self.tenant, self.store, self.key, self.version, self.block_size],
                          separators=(",", ":"))

    def blocks(self) -> int:
        return (self.size + self.block_size - 1) // self.block_size

    def block_length(self, index: int) -> int:
        return max(0, min(self.block_size, self.size - index * self.block_size))

    def name(self, fmt: str) -> str:
        """The file name stem: a hash, so no key, tenant or store ever appears in a path."""
        return hashlib.sha256(self.encode(fmt).encode()).hexdigest()[:40]


@dataclass(frozen=True)
class DataFile:
    """An index value that is a file of ours (relative to the cache directory): diskcache counts
    its size and unlinks it on eviction (``cache._BlockDisk``)."""

    relpath: str
    size: int

    @property
    def token(self) -> int:
        stem = os.path.basename(self.relpath).rsplit(".", 1)[0]
        return int(stem.rsplit("-", 1)[1], 16)

    @property
    def complete(self) -> bool:
        return self.relpath.endswith(COMPLETE)

    def published(self) -> DataFile:
        return DataFile(self.relpath[: -len(PARTIAL)] + COMPLETE, self.size)


def new_partial(directory: str, oid: ObjectId, fmt: str) -> DataFile:
    """Create an empty (sparse) data file of the object's size; the caller indexes it."""
    name = oid.name(fmt)
    token = secrets.randbits(63) or 1
    rel = os.path.join(SUBDIR, name[:2], f"{name}-{token:016x}{PARTIAL}")
    path = os.path.join(directory, rel)
    for attempt in range(10):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            break
        except FileNotFoundError:  # another process removed the emptied sub-directory meanwhile
            if attempt == 9:
                raise
    try:
        os.ftruncate(fd, oid.size)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return DataFile(rel, oid.size)


def publish(directory: str, data: DataFile) -> DataFile:
    """Make a verified partial file read-only and rename it complete. Raises FileNotFoundError if
    it is gone: evicted, or published by another server meanwhile, which then also re-points the
    index row (doing it twice would unlink the file: see ``NodeCache._publish``)."""
    src = os.path.join(directory, data.relpath)
    done = data.published()
    os.chmod(src, 0o400)  # its owner only, like every file of the cache: tenants' bytes
    os.rename(src, os.path.join(directory, done.relpath))
    return done


def tenant_of(config: MountConfig) -> str:
    """The cache namespace of a mount's credentials: a hash of the endpoint and the access key id
    (S3) or service account e-mail (GCS), never of a secret alone; "" for ambient credentials."""
    creds = config.credentials
    principal = creds.access_key_id or ""
    if not principal and creds.service_account_json:
        try:
            principal = str(json.loads(creds.service_account_json).get("client_email") or "")
        except (ValueError, AttributeError):
            principal = ""
        # an unparsable key file still names someone: its hash (the server rejects it anyway)
        principal = principal or "json:" + hashlib.sha256(creds.service_account_json.encode()).hexdigest()
    if not principal:
        return ""
    ident = json.dumps([config.backend, config.endpoint_url or "", principal], separators=(",", ":"))
    return hashlib.sha256(ident.encode()).hexdigest()[:32]
