"""``DataClient``: everything the filesystem layer (``fusefs.fs.ops``, ``meta``, ``read``, ``write``)
needs of its volume's data, whichever side serves it.

Two implementations: ``fusefs.service.local.LocalData`` (the service in this process: a
standalone ``objfs mount``, one trust domain) and ``fusefs.wire.grant.GrantClient`` (a pod's
sidecar, talking to the node's data service over its grant connection). The filesystem cannot
tell them apart: one code path for the data.

Object keys are full keys in the bucket (the mount's prefix included); the service refuses keys
outside its grant's prefix. ``read_block`` goes through the node cache where the service has one;
``backing_open`` answers a FUSE passthrough backing id for a complete cached copy, or 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from fusefs.store.base import ListPage, MultipartUpload, ObjectInfo, StoreLimits


class DataClient(Protocol):
    #: identifies store and bucket (``AsyncStore.identity``)
    identity: str
    limits: StoreLimits
    #: the block size of ``read_block``: the service's, which the reader must use
    block_size: int
    #: whether blocks go through a node cache (warming the cache means something)
    node_cache: bool
    #: whether ``backing_open`` can ever answer an id (a cache and a registrar on the service side)
    passthrough: bool
    #: the volume asked for the node cache and the service has none usable (a problem to report)
    cache_disabled: bool

    @property
    def requests(self) -> int:
        """Store requests issued for this client so far (stats)."""
        ...

    async def check_access(self) -> None: ...
    async def head(self, key: str) -> ObjectInfo: ...
    async def list(self, prefix: str, delimiter: str | None = "/", token: str | None = None,
                   max_keys: int = 1000) -> ListPage: ...
    async def get_range(self, key: str, start: int, length: int, version: str | None = None) -> bytes: ...
    async def peek(self, key: str, length: int) -> tuple[ObjectInfo, bytes]:
        """What ``head`` answers and the object's first ``length`` bytes (at most ``block_size``;
        fewer when it is shorter), both of the one version described, in one GET. When they are
        its whole block 0 (the whole object, or a whole block), the service keeps them in the node
        cache as that block of that version: give them to the reader too, and the read that
        follows costs no request."""
        ...

    async def put(self, key: str, data: bytes | memoryview, meta: Mapping[str, str] | None = None) -> ObjectInfo:
        """``meta``: the object's user metadata (``fusefs.filemeta``), sent with the upload."""
        ...

    async def create_multipart(self, key: str, meta: Mapping[str, str] | None = None) -> MultipartUpload: ...
    async def upload_part(self, upload: MultipartUpload, number: int, data: bytes | memoryview) -> None: ...
    async def upload_part_copy(self, upload: MultipartUpload, number: int, src: ObjectInfo, start: int,
                               length: int) -> None:
        """Part ``number`` copied by the store from bytes [start, start + length) of ``src`` (an
        object of this volume, that version), where ``limits.part_copy`` allows it."""
        ...

    async def complete(self, upload: MultipartUpload) -> ObjectInfo: ...
    async def abort(self, upload: MultipartUpload) -> None: ...
    async def copy(self, src: str, dst: str) -> ObjectInfo: ...

    async def set_meta(self, info: ObjectInfo, meta: Mapping[str, str]) -> ObjectInfo:
        """Replace the user metadata of the object ``info`` names (that version: a changed object
        fails with ObjectChangedError), keeping its bytes; the new description."""
        ...

    async def delete(self, key: str) -> None: ...

    # -- blocks ------------------------------------------------------------------------------
    async def read_block(self, info: ObjectInfo, index: int, warming: bool = False) -> bytes:
        """Block ``index`` (of ``block_size``) of the pinned version ``info``, through the node
        cache where there is one. ``warming``: wait for room in the cache rather than skip it."""
        ...

    async def on_node(self, info: ObjectInfo, index: int) -> bool:
        """Whether the block is in the node cache (it then answers fast, without a request)."""
        ...

    # -- passthrough -------------------------------------------------------------------------
    async def backing_open(self, info: ObjectInfo) -> int:
        """A FUSE backing id (on this mount's connection) for the complete cached copy of
        ``info``, registered read-only; 0 when there is none (the server answers reads)."""
        ...

    async def backing_close(self, backing_id: int) -> None: ...

    async def aclose(self) -> None: ...
