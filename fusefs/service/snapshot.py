"""``SnapshotData``: the data service of a read-only volume of a snapshot, served from its manifest.

The volume shows the snapshot's objects under its prefix (the snapshot's ``data/`` folder) as
the manifest lists them, whatever the store holds there now: listings and metadata come from the
manifest (no LIST or HEAD of the store), and every read is of the version the manifest pins, at
the key where it is: a server-side copy in ``data/``, or, where the bucket keeps versions, the
source volume's own object at its version id (``vid:``). Nothing a client names is fetched
unless the manifest lists it with that very version and size, so the grant reaches exactly the
snapshot, and writes are refused (EROFS) as on every read-only grant.
"""

from __future__ import annotations

import bisect
import logging
from typing import Any

import trio

from fusefs import errors
from fusefs.service.local import LocalData
from fusefs.service.manifest import Entry, Manifest
from fusefs.store.base import ListPage, ObjectInfo

log = logging.getLogger(__name__)

#: the largest manifest the service holds (about 100 bytes a line: a million objects)
MAX_MANIFEST = 256 * 1024 * 1024


class SnapshotData(LocalData):
    """A ``DataClient`` whose namespace is a snapshot manifest (``MountConfig.snapshot``)."""

    def __init__(self, *args: Any, manifest_key: str, **kw: Any) -> None:
        """``LocalData``'s arguments (a read-only scope), and the key of the snapshot's manifest
        in the grant's bucket (``MountConfig.snapshot``)."""
        super().__init__(*args, **kw)
        if not self.scope.read_only:
            raise ValueError("a snapshot's volume is served read-only")
        self.manifest_key = manifest_key
        self._loaded: tuple[Manifest, dict[str, Entry], list[str], dict[str, Entry]] | None = None
        self._loading = trio.Lock()

    async def _manifest(self) -> tuple[Manifest, dict[str, Entry], list[str], dict[str, Entry]]:
        """(manifest, entries by presented key, the presented keys sorted, entries by real key):
        read once per connection, with the grant's credentials."""
        async with self._loading:
            if self._loaded is None:
                key = self.manifest_key
                info = await self.store.head(key)
                if info.size > MAX_MANIFEST:
                    raise errors.InvalidRequestError(f"snapshot manifest {key} is {info.size} bytes, over "
                                                     f"{MAX_MANIFEST}", key=key)
                raw = await self.store.get_range(key, 0, info.size, info.version) if info.size else b""
                try:
                    manifest = await trio.to_thread.run_sync(Manifest.loads, raw)
                except (ValueError, KeyError, TypeError) as exc:
                    raise errors.StoreError(f"{key} is not a valid snapshot manifest: {exc}", key=key) from None
                data = manifest.data or self.scope.prefix
                shown = {self.scope.prefix + e.key: e for e in manifest.entries}
                real = {data + e.key: e for e in manifest.entries}
                self._loaded = (manifest, shown, sorted(shown), real)
                log.info("snapshot %s: %d objects, %s", manifest.name, manifest.count,
                         "pinned versions" if manifest.pinned else "copies")
            return self._loaded

    async def _real(self, info_or_key: ObjectInfo | str) -> ObjectInfo:
        """The object a presented key (or ObjectInfo, whose version and size must be the
        manifest's) stands for: its real key and pinned version."""
        key = info_or_key if isinstance(info_or_key, str) else info_or_key.key
        manifest, shown, _, _ = await self._manifest()
        entry = shown.get(self.scope.key(key))
        if entry is None:
            raise errors.NotFoundError(f"{key!r} is not in snapshot {manifest.name}", key=key)
        if isinstance(info_or_key, ObjectInfo) and (info_or_key.version, info_or_key.size) != (entry.copy, entry.size):
            raise errors.ObjectChangedError(f"{key!r}: not the version snapshot {manifest.name} holds", key=key)
        return ObjectInfo(key=(manifest.data or self.scope.prefix) + entry.key, size=entry.size, version=entry.copy,
                          mtime=manifest.created)

    def _check_object(self, info: ObjectInfo) -> None:
        """Only an object of the manifest, at its pinned version (a real key: ``_real``'s)."""
        loaded = self._loaded
        entry = loaded[3].get(info.key) if loaded is not None else None
        if entry is None or (entry.copy, entry.size) != (info.version, info.size):
            raise errors.AccessDeniedError(f"{info.key!r} at {info.version} is not in this snapshot", key=info.key)

    # -- what the manifest answers -----------------------------------------------------------
    async def check_access(self) -> None:
        await self._manifest()

    async def head(self, key: str) -> ObjectInfo:
        real = await self._real(key)
        return ObjectInfo(key=key, size=real.size, version=real.version, mtime=real.mtime)

    async def list(self, prefix: str, delimiter: str | None = "/", token: str | None = None,
                   max_keys: int = 1000) -> ListPage:
        manifest, shown, keys, _ = await self._manifest()
        self.scope.key(prefix)
        max_keys = max(1, min(1000, max_keys))
        page = ListPage()
        i = bisect.bisect_right(keys, token) if token else bisect.bisect_left(keys, prefix)
        last = ""
        while i < len(keys) and keys[i].startswith(prefix):
            key = keys[i]
            cut = key.find(delimiter, len(prefix)) if delimiter else -1
            if len(page.objects) + len(page.prefixes) == max_keys:
                page.next_token = last
                break
            if cut >= 0:
                common = key[:cut + len(delimiter or "")]
                page.prefixes.append(common)
                last = common + "\U0010ffff"  # past every key under the common prefix
                i = bisect.bisect_right(keys, last)
                continue
            e = shown[key]
            page.objects.append(ObjectInfo(key=key, size=e.size, version=e.copy, mtime=manifest.created))
            last = key
            i += 1
        return page

    async def peek(self, key: str, length: int) -> tuple[ObjectInfo, bytes]:
        """The manifest describes it (no request); its bytes are read as blocks of the real object."""
        return await self.head(key), b""

    async def get_range(self, key: str, start: int, length: int, version: str | None = None) -> bytes:
        real = await self._real(key)
        if version and version != real.version:
            raise errors.ObjectChangedError(f"{key!r}: not the version this snapshot holds", key=key)
        return await self.get_range_of(real, start, length)

    # -- blocks and passthrough of the real objects --------------------------------------------
    async def read_block_from(self, info: ObjectInfo, index: int, warming: bool = False) -> tuple[bytes, bool]:
        return await super().read_block_from(await self._real(info), index, warming)

    async def on_node(self, info: ObjectInfo, index: int) -> bool:
        return await super().on_node(await self._real(info), index)

    async def backing_open(self, info: ObjectInfo) -> int:
        return await super().backing_open(await self._real(info))
