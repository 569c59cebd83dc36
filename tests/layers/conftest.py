"""``fs``: ``fusefs.fs.ops.Operations`` driven in-process, with no kernel and no server.

The filesystem runs as a mount runs it (``Operations`` over ``LocalData`` over an ``AsyncStore``)
but on the in-memory store (``fusefs.store.memory``), behind the failure wrapper
(``fusefs.store.faulty``) so a test can make chosen store calls fail. A test calls the FUSE
operations as the kernel would, by inode and handle; ``Fs`` adds path helpers for the steps a
test does not check itself.

The one piece of pyfuse3 that needs a kernel request is ``readdir_reply`` (it writes into the
request's reply buffer): ``fs`` replaces it, for the test, with ``DirReply.add``, which collects
the entries and answers "full" after ``capacity`` of them, as a small reply buffer would.
"""

from __future__ import annotations

import os
import types
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pyfuse3
import pytest
import trio

from fusefs.config import MiB, MountConfig, Tuning
from fusefs.fs.ops import Operations
from fusefs.retry import RetryPolicy
from fusefs.service.local import LocalData
from fusefs.store.base import AsyncStore
from fusefs.store.faulty import FaultyStore
from fusefs.store.memory import MemoryStore

ROOT = pyfuse3.ROOT_INODE
#: small blocks and parts, so a few MiB cover several of each
TUNING = Tuning(block_size=1 * MiB, memory_blocks=4, max_prefetch_blocks=2, part_size=5 * MiB,
                max_upload_parts_in_flight=2, retry_deadline=2.0)
#: a transient fault is retried twice, at once: a store that stays down fails a call fast
POLICY = RetryPolicy(max_attempts=3, base_delay=0.0, max_delay=0.0, deadline=5.0)


@dataclass
class DirReply:
    """What a readdir answered: (name, attributes, next start id) per entry, up to ``capacity``."""

    capacity: int = 1 << 30
    entries: list[tuple[str, pyfuse3.EntryAttributes, int]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.entries]

    @staticmethod
    def add(token: DirReply, name: bytes, attrs: pyfuse3.EntryAttributes, next_id: int) -> bool:
        """Stands in for ``pyfuse3.readdir_reply``: False once the reply is full (the entry is
        not taken, as libfuse does not take one that does not fit)."""
        if len(token.entries) >= token.capacity:
            return False
        token.entries.append((os.fsdecode(name), attrs, next_id))
        return True


def setattr_fields(**updates: bool) -> pyfuse3.SetattrFields:
    """The fields a SETATTR changes (pyfuse3's own class is filled only by the kernel request)."""
    names = ("update_atime", "update_mtime", "update_ctime", "update_mode", "update_uid", "update_gid",
             "update_size")
    unknown = set(updates) - set(names)
    if unknown:
        raise ValueError(f"unknown setattr fields {sorted(unknown)}: use {names}")
    return cast(pyfuse3.SetattrFields, types.SimpleNamespace(**{n: updates.get(n, False) for n in names}))


@dataclass
class Fs:
    ops: Operations
    memory: MemoryStore  # the objects, as the store holds them (no faults, not counted)
    store: FaultyStore  # what the layers call: faults go here, ``calls`` counts the requests
    config: MountConfig
    ctx: pyfuse3.RequestContext = field(default_factory=pyfuse3.RequestContext)

    def key(self, path: str) -> str:
        return self.config.prefix + path

    async def lookup(self, path: str) -> pyfuse3.EntryAttributes:
        """Look up every component of ``path`` from the root, as the kernel does."""
        attrs = await self.ops.getattr(ROOT, self.ctx)
        for name in [p for p in path.split("/") if p]:
            attrs = await self.ops.lookup(attrs.st_ino, os.fsencode(name), self.ctx)
            if attrs.st_ino == 0:
                raise FileNotFoundError(path)
        return attrs

    async def inode(self, path: str) -> int:
        return int((await self.lookup(path)).st_ino)

    async def readdir(self, path: str, capacity: int = 1 << 30) -> list[str]:
        """opendir, readdir until the end (``capacity`` entries per call), releasedir."""
        fh = await self.ops.opendir(await self.inode(path), self.ctx)
        names: list[str] = []
        start = 0
        try:
            while True:
                reply = DirReply(capacity)
                await self.ops.readdir(fh, start, cast(pyfuse3.ReaddirToken, reply))
                if not reply.entries:
                    return names
                names += reply.names
                start = reply.entries[-1][2]
        finally:
            await self.ops.releasedir(fh)

    async def write_file(self, path: str, data: bytes, chunk: int = 128 * 1024) -> int:
        """create, write in ``chunk``s, flush, release (a new file's close); its inode."""
        parent, _, name = path.rpartition("/")
        info, attrs = await self.ops.create(await self.inode(parent), os.fsencode(name), 0o644,
                                            os.O_WRONLY | os.O_CREAT | os.O_TRUNC, self.ctx)
        for off in range(0, len(data), chunk):
            assert await self.ops.write(info.fh, off, data[off:off + chunk]) == len(data[off:off + chunk])
        await self.ops.flush(info.fh)
        await self.ops.release(info.fh)
        return int(attrs.st_ino)

    async def read_file(self, path: str, chunk: int = 128 * 1024) -> bytes:
        """open read-only, read to the end in ``chunk``s, release."""
        info = await self.ops.open(await self.inode(path), os.O_RDONLY, self.ctx)
        try:
            return await self.read_all(info.fh, chunk)
        finally:
            await self.ops.release(info.fh)

    async def read_all(self, fh: int, chunk: int = 128 * 1024) -> bytes:
        parts = []
        off = 0
        while piece := bytes(await self.ops.read(fh, off, chunk)):
            parts.append(piece)
            off += len(piece)
        return b"".join(parts)


@pytest.fixture
async def fs(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Fs]:
    """A fresh filesystem on an empty in-memory bucket (no node cache: reads go to the store).
    Its metadata TTL is a mount's default; ``@pytest.mark.parametrize("fs", [0.0], indirect=True)``
    sets another (0: every open and getattr asks the store)."""
    monkeypatch.setattr(pyfuse3, "readdir_reply", DirReply.add)
    memory = MemoryStore("layers")
    faulty = FaultyStore(memory)
    ttl = float(getattr(request, "param", MountConfig.metadata_ttl))
    config = MountConfig(backend="s3", bucket="layers", cache_dir=None, metadata_ttl=ttl, tuning=TUNING)
    data = LocalData.for_config(config, AsyncStore(faulty, policy=POLICY))
    staging = tmp_path / "staging"
    staging.mkdir()
    async with trio.open_nursery() as nursery:
        ops = Operations(config, data, nursery, str(staging))
        yield Fs(ops, memory, faulty, config)
        nursery.cancel_scope.cancel()
    await data.aclose()


@pytest.fixture
async def meta_fs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Fs]:
    """The layers' filesystem on a volume that keeps per-file metadata (S3: listings carry none)."""
    monkeypatch.setattr(pyfuse3, "readdir_reply", DirReply.add)
    memory = MemoryStore("layers")
    faulty = FaultyStore(memory)
    config = MountConfig(backend="s3", bucket="layers", cache_dir=None, tuning=TUNING, file_metadata=True)
    data = LocalData.for_config(config, AsyncStore(faulty, policy=POLICY))
    async with trio.open_nursery() as nursery:
        ops = Operations(config, data, nursery, str(tmp_path))
        yield Fs(ops, memory, faulty, config)
        nursery.cancel_scope.cancel()
    await data.aclose()
