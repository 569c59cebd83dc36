"""CSI Controller service: dynamic provisioning without local state.

Two provisioning modes, chosen by the StorageClass parameters:
- with ``bucket``: each volume is the prefix ``<prefix>/<volume name>/`` in that bucket;
- without: each volume is a bucket of its own, named validly from the volume name.

What the controller must remember lives in the store: a small marker object
``.objfs-volume.json`` in the volume's prefix holds the volume name and capacity (for idempotent
CreateVolume) and proves that DeleteVolume deletes a volume we created, never data that a forged
or mistyped ID points at.

Snapshots and volumes made from a snapshot or another volume (``csi.services.snapshots``) are kept in the
store as well: a snapshot is a manifest written last beside server-side copies of the volume's
objects, and a new volume from either source is filled by server-side copies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf import timestamp_pb2

from csi import params as P
from csi import volume_id as V
from csi.errors import (
    AlreadyExists,
    CsiError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    from_store_error,
)
from csi.node.state import KeyedLocks
from csi.services import snapshots as S
from csi.v1 import csi_pb2, csi_pb2_grpc
from fusefs import errors as store_errors
from fusefs.config import ConfigError, MountConfig, Tuning, normalize_prefix
from fusefs.retry import RetryPolicy, call_sync
from fusefs.store import BlockingStore, ObjectInfo, open_store

log = logging.getLogger(__name__)
T = TypeVar("T")

MARKER = S.MARKER
# The provisioner's own timeout is short (10 s by default) and it retries: fail within it.
CONTROLLER_RETRY = RetryPolicy(max_attempts=4, max_delay=2.0, deadline=15.0)
CONTROLLER_TUNING = Tuning(request_timeout=15.0)


def bucket_name_for(volume_name: str) -> str:
    """A valid, stable S3/GCS bucket name (lower-case, <= 63) for a CSI volume name.

    Names from csi-sanity are 128 characters of upper-case hex, from Kubernetes ``pvc-<uuid>``:
    a readable slug of the name plus a hash of the whole name keeps them apart.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", volume_name.lower()).strip("-")[:52].strip("-") or "vol"
    if slug.startswith(("xn--", "sthree-")):
        slug = "v-" + slug
    digest = hashlib.sha256(volume_name.encode()).hexdigest()[:10]
    return f"{slug}-{digest}"


def _store(vid: V.VolumeId | V.SnapshotId, secrets: Mapping[str, str]) -> BlockingStore:
    try:
        config = MountConfig(
            backend=vid.backend, bucket=vid.bucket, prefix=vid.prefix, endpoint_url=vid.endpoint or None,
            region=vid.region or None, credentials=P.credentials(secrets, vid.backend), tuning=CONTROLLER_TUNING,
        )
    except ConfigError as e:
        raise InvalidArgument(str(e)) from None
    return open_store(config)


def _call(what: str, fn: Callable[[], T]) -> T:
    try:
        return call_sync(fn, CONTROLLER_RETRY, what)
    except store_errors.StoreError as e:
        raise from_store_error(e, what) from None


def _volume_that_exists(text: str, what: str = "volume") -> V.VolumeId:
    """A volume ID that a later lookup will find or not; one that is not ours names nothing."""
    try:
        return V.parse(text)
    except V.MalformedVolumeId:
        raise NotFound(f"{what} {text!r} does not exist (not an objfs volume ID)") from None


def _list_source(store: BlockingStore, vid: V.VolumeId, volume_id: str, versions: bool = False
                 ) -> list[ObjectInfo]:
    """The data objects of a source volume (one LIST pass), NotFound if it is not a volume;
    ``versions``: each pinned by its version id."""
    try:
        _call("read the source volume's marker", lambda: store.head(vid.prefix + MARKER))
    except NotFound:
        raise NotFound(f"source volume {volume_id!r} does not exist") from None
    return _call(f"list volume {vid.bucket}/{vid.prefix}",
                 lambda: S.list_volume(store, vid.prefix, CONTROLLER_RETRY, versions))


def _source_id(text: str, kind: str) -> str:
    if not text:
        raise InvalidArgument(f"volume_content_source.{kind}.{kind}_id is required")
    return text


def _ours_to_delete(text: str, field: str, parse: Callable[[str], T], malformed: type[ValueError]) -> T | None:
    """The parsed ID of a Delete call, None for an ID that is not ours: nothing of ours to
    delete (the CSI spec wants OK for gone volumes and snapshots)."""
    if not text:
        raise InvalidArgument(f"{field} is required")
    try:
        return parse(text)
    except malformed:
        log.info("delete of foreign or malformed %s %r: nothing to do", field, text)
        return None


def _snapshot_pb(sid: V.SnapshotId, m: S.Manifest) -> csi_pb2.Snapshot:
    created = timestamp_pb2.Timestamp()
    created.FromNanoseconds(int(m.created * 1e9))
    # ready_to_use is true because a manifest exists only once every copy is made.
    return csi_pb2.Snapshot(size_bytes=m.size_bytes, snapshot_id=str(sid), source_volume_id=m.source_volume_id,
                            creation_time=created, ready_to_use=True)


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self) -> None:
        self.locks = KeyedLocks()
        # (backend, bucket, endpoint, region) of the snapshot roots seen since start: where an
        # unfiltered ListSnapshots looks (no credentials kept: each request brings its own)
        self._roots: set[tuple[str, str, str, str]] = set()
        self._roots_lock = threading.Lock()

    # -- CreateVolume --------------------------------------------------------------------------
    def CreateVolume(self, request: csi_pb2.CreateVolumeRequest, context: grpc.ServicerContext
                     ) -> csi_pb2.CreateVolumeResponse:
        if not request.name:
            raise InvalidArgument("name is required")
        if request.name.startswith(S.RESERVED_NAME_PREFIX):
            raise InvalidArgument(f"volume names starting with {S.RESERVED_NAME_PREFIX!r} are reserved for objfs")
        if not request.volume_capabilities:
            raise InvalidArgument("volume_capabilities are required")
        for i, cap in enumerate(request.volume_capabilities):
            P.check_capability(cap, f"volume_capabilities[{i}]")
        capacity = self._capacity(request.capacity_range)
        p = P.parse(request.parameters)
        vid = self._volume_id(request.name, p)
        source = self._content_source(request, vid)
        view = isinstance(source[1], V.SnapshotId) and all(
            P.is_reader_only(c.access_mode.mode) for c in request.volume_capabilities)
        if view:
            # Read-only volumes of a snapshot copy nothing: the node serves the snapshot itself.
            assert isinstance(source[1], V.SnapshotId)
            vid = self._create_view(request, source[0], source[1], capacity)
        else:
            self._create(request, vid, source, capacity)
        context_out = {k: v for k, v in P.user_keys(request.parameters).items() if k not in P.LOCATION_KEYS}
        log.info("volume %s is %s%s", request.name, vid, f" (from {source[0]})" if source[0] else "")
        volume = csi_pb2.Volume(volume_id=str(vid), capacity_bytes=capacity, volume_context=context_out)
        if request.HasField("volume_content_source"):
            volume.content_source.CopyFrom(request.volume_content_source)
        return csi_pb2.CreateVolumeResponse(volume=volume)

    def _create(self, request: csi_pb2.CreateVolumeRequest, vid: V.VolumeId,
                source: tuple[str, V.VolumeId | V.SnapshotId | None], capacity: int) -> None:
        with self.locks.hold(f"create/{request.name}"):
            store = _store(vid, request.secrets)
            marker = self._existing_marker(store, vid, request.name, capacity, source[0])
            # A repeat of a finished call is answered from the marker alone (its source may be
            # gone by now); a new volume, or one a failed call left half-filled, is (re)filled.
            if marker is None or not marker.get("populated", True):
                fill = self._plan_fill(source, vid, store, request.secrets, capacity)
                if marker is None:
                    marker = self._new_volume(store, vid, request.name, capacity, source[0])
                if not marker.get("populated", True):
                    self._fill(store, vid, request.name, fill)
                    marker["populated"] = True
                    body = json.dumps(marker).encode()
                    _call(f"write volume marker of {request.name}", lambda: store.put(vid.prefix + MARKER, body))

    def _create_view(self, request: csi_pb2.CreateVolumeRequest, ref: str, sid: V.SnapshotId, capacity: int
                     ) -> V.VolumeId:
        """A read-only volume of the snapshot ``sid``: a marker in the snapshot's ``volumes/``
        folder (so DeleteSnapshot knows the snapshot is in use), no data of its own."""
        vid = V.VolumeId(V.KIND_SNAPSHOT, sid.backend, sid.bucket, f"{sid.prefix}{S.VOLUMES}{S.segment(request.name)}/",
                         sid.endpoint, sid.region)
        with self.locks.hold(f"snapshot/{sid}"):
            store = _store(sid, request.secrets)
            if self._existing_marker(store, vid, request.name, capacity, ref) is not None:
                return vid
            try:
                header = self._header(store, sid)
            except InvalidArgument:
                header = None  # its bucket is gone
            if header is None:
                raise NotFound(f"snapshot {ref.split(':', 1)[1]!r} does not exist")
            if capacity and capacity < header.size_bytes:
                raise OutOfRange(f"the snapshot holds {header.size_bytes} bytes, more than the {capacity} bytes "
                                 "requested: request at least its size")
            marker = {"name": request.name, "capacity": capacity, "created": time.time(), "source": ref}
            body = json.dumps(marker).encode()
            _call(f"write volume marker of {request.name}", lambda: store.put(vid.prefix + MARKER, body))
        return vid

    @staticmethod
    def _content_source(request: csi_pb2.CreateVolumeRequest, vid: V.VolumeId
                        ) -> tuple[str, V.VolumeId | V.SnapshotId | None]:
        """(the source's ID as the marker records it, its parsed ID); ('', None) for an empty
        volume. An ID that is not ours names nothing that exists: NotFound, as the spec says."""
        if not request.HasField("volume_content_source"):
            return "", None
        src = request.volume_content_source
        parsed: V.VolumeId | V.SnapshotId
        kind = src.WhichOneof("type")
        if kind == "snapshot":
            text = _source_id(src.snapshot.snapshot_id, "snapshot")
            parse: Callable[[str], V.VolumeId | V.SnapshotId] = V.parse_snapshot
        elif kind == "volume":
            text = _source_id(src.volume.volume_id, "volume")
            parse = V.parse
        else:
            raise InvalidArgument("volume_content_source names neither a snapshot nor a volume")
        try:
            parsed = parse(text)
        except (V.MalformedSnapshotId, V.MalformedVolumeId):
            raise NotFound(f"{kind} {text!r} does not exist (not an objfs {kind} ID)") from None
        if isinstance(parsed, V.VolumeId) and parsed.kind == V.KIND_SNAPSHOT:
            # a clone of a snapshot's read-only volume is a volume of that snapshot
            parsed = V.SnapshotId(parsed.backend, parsed.bucket, parsed.snapshot_folder, parsed.endpoint, parsed.region)
        ref = f"{kind}:{text}"
        # Server-side copies work within one store only.
        if (parsed.backend, parsed.endpoint, parsed.region) != (vid.backend, vid.endpoint, vid.region):
            raise InvalidArgument(
                f"the content source is on another store ({parsed.backend} {parsed.endpoint or 'default endpoint'}) "
                f"than the new volume ({vid.backend} {vid.endpoint or 'default endpoint'}): use a StorageClass "
                "with the same backend, endpoint and region"
            )
        return ref, parsed

    def _plan_fill(self, source: tuple[str, V.VolumeId | V.SnapshotId | None], vid: V.VolumeId,
                   store: BlockingStore, secrets: Mapping[str, str], capacity: int) -> list[S.CopyJob]:
        """The copies that fill a new volume from its source, found before anything is created
        (a source that does not exist is NotFound with nothing made)."""
        ref, parsed = source
        if parsed is None:
            return []
        if isinstance(parsed, V.SnapshotId):
            snap_store = store if parsed.bucket == vid.bucket else _store(parsed, secrets)
            try:
                manifest = S.read_manifest(snap_store, parsed.prefix, CONTROLLER_RETRY)
            except store_errors.NotFoundError:
                raise NotFound(f"snapshot {ref.split(':', 1)[1]!r} does not exist") from None
            except store_errors.StoreError as e:
                raise from_store_error(e, "read the snapshot's manifest") from None
            size = manifest.size_bytes
            data = manifest.data or parsed.prefix + S.DATA  # copies, or the source's pinned versions
            jobs = [S.CopyJob(parsed.bucket, data + e.key, vid.prefix + e.key, e.size, e.copy, e.key)
                    for e in manifest.entries]
        else:
            src_store = store if parsed.bucket == vid.bucket else _store(parsed, secrets)
            objects = _list_source(src_store, parsed, ref.split(":", 1)[1])
            size = sum(o.size for o in objects)
            jobs = S.jobs_for(objects, parsed.bucket, parsed.prefix, vid.prefix)
        if capacity and capacity < size:
            raise OutOfRange(f"the content source holds {size} bytes, more than the {capacity} bytes requested: "
                             "request at least its size")
        return jobs

    @staticmethod
    def _fill(store: BlockingStore, vid: V.VolumeId, name: str, jobs: list[S.CopyJob]) -> None:
        try:
            S.copy_all(store, jobs, CONTROLLER_RETRY)
        except store_errors.StoreError as e:
            # The marker still says "not populated": a retry copies again, DeleteVolume removes it all.
            raise from_store_error(e, f"fill volume {name} from its content source") from None

    @staticmethod
    def _capacity(rng: csi_pb2.CapacityRange) -> int:
        # Object storage has no size; the requested capacity is recorded and reported back so
        # the CO sees what it asked for (and repeats with another size are told apart).
        required, limit = rng.required_bytes, rng.limit_bytes
        if required < 0 or limit < 0:
            raise InvalidArgument("capacity_range must not be negative")
        if limit and required > limit:
            raise OutOfRange(f"capacity_range: required_bytes {required} exceeds limit_bytes {limit}")
        return required or limit

    @staticmethod
    def _volume_id(name: str, p: P.VolumeParams) -> V.VolumeId:
        if p.bucket:
            try:
                prefix = normalize_prefix(p.prefix + name)
            except ConfigError:
                raise InvalidArgument(f"name {name!r} cannot be used as a key prefix") from None
            return V.VolumeId(V.KIND_PREFIX, p.backend, p.bucket, prefix, p.endpoint, p.region)
        return V.VolumeId(V.KIND_BUCKET, p.backend, bucket_name_for(name), p.prefix, p.endpoint, p.region)

    @staticmethod
    def _new_volume(store: BlockingStore, vid: V.VolumeId, name: str, capacity: int, source: str) -> dict[str, Any]:
        """Create the bucket (or check the shared one) and write the marker. A volume with a
        content source is marked unpopulated until its copies are done, so a retry fills it
        again and DeleteVolume still finds (and removes) a half-filled one."""
        if vid.owns_bucket:
            _call(f"create bucket {vid.bucket}", store.create_bucket)
        else:
            _call(f"check bucket {vid.bucket}", lambda: store.check_access())  # type: ignore[call-arg]
        marker: dict[str, Any] = {"name": name, "capacity": capacity, "created": time.time()}
        if source:
            marker.update(source=source, populated=False)
        body = json.dumps(marker).encode()
        _call(f"write volume marker of {name}", lambda: store.put(vid.prefix + MARKER, body))
        return marker

    @staticmethod
    def _existing_marker(store: BlockingStore, vid: V.VolumeId, name: str, capacity: int, source: str
                         ) -> dict[str, Any] | None:
        """The volume's marker if the volume exists (None if not, or not yet: its bucket may be
        missing too); ALREADY_EXISTS if it is another volume's or another request's."""
        key = vid.prefix + MARKER
        try:
            info = _call(f"read volume marker of {name}", lambda: store.head(key))
        except NotFound:
            return None
        raw = _call(f"read volume marker of {name}", lambda: store.get_range(key, 0, info.size))
        try:
            marker = json.loads(raw)
        except ValueError:
            raise AlreadyExists(f"{vid.bucket}/{key} exists but is not an objfs volume marker") from None
        if not isinstance(marker, dict):
            raise AlreadyExists(f"{vid.bucket}/{key} exists but is not an objfs volume marker")
        if marker.get("name") != name:
            raise AlreadyExists(f"{vid.bucket}/{vid.prefix} already belongs to volume {marker.get('name')!r}")
        if int(marker.get("capacity", 0)) != capacity:
            raise AlreadyExists(
                f"volume {name} already exists with capacity {marker.get('capacity')} bytes, not {capacity}"
            )
        if marker.get("source", "") != source:
            raise AlreadyExists(
                f"volume {name} already exists with content source {marker.get('source') or 'none'!r}, "
                f"not {source or 'none'!r}"
            )
        return marker

    # -- DeleteVolume --------------------------------------------------------------------------
    def DeleteVolume(self, request: csi_pb2.DeleteVolumeRequest, context: grpc.ServicerContext
                     ) -> csi_pb2.DeleteVolumeResponse:
        vid = _ours_to_delete(request.volume_id, "volume_id", V.parse, V.MalformedVolumeId)
        if vid is None:
            return csi_pb2.DeleteVolumeResponse()
        with self.locks.hold(f"delete/{request.volume_id}"):
            store = _store(vid, request.secrets)
            marker = vid.prefix + MARKER
            try:
                _call(f"read volume marker in {vid.bucket}", lambda: store.head(marker))
            except NotFound:
                return csi_pb2.DeleteVolumeResponse()  # already deleted (or never ours)
            # Snapshots own copies of their data, so none of them needs anything deleted here;
            # a bucket that is also a snapshot root keeps its snapshots (and so the bucket).
            kept = _call(f"delete the objects of {vid.bucket}/{vid.prefix}", lambda: S.delete_prefix(
                store, vid.prefix, CONTROLLER_RETRY,
                keep=lambda k: k == marker or (not vid.prefix and k.startswith(S.SNAPSHOT_DIR))))
            _call(f"delete {marker}", lambda: store.delete(marker))
            if vid.owns_bucket and kept <= 1:
                try:
                    _call(f"delete bucket {vid.bucket}", store.delete_bucket)
                except NotFound:
                    pass
            elif vid.owns_bucket:
                log.warning("bucket %s of volume %s holds snapshots: kept", vid.bucket, request.volume_id)
        return csi_pb2.DeleteVolumeResponse()

    # -- snapshots -----------------------------------------------------------------------------
    def CreateSnapshot(self, request: csi_pb2.CreateSnapshotRequest, context: grpc.ServicerContext
                       ) -> csi_pb2.CreateSnapshotResponse:
        """Copies the volume's objects server-side, then writes the manifest: the call returns
        once the snapshot is whole (``ready_to_use``), or fails leaving none. A CO that gives up
        waiting and calls again gets ABORTED until the first call is done, then the snapshot."""
        if not request.name:
            raise InvalidArgument("name is required")
        if not request.source_volume_id:
            raise InvalidArgument("source_volume_id is required")
        vid = _volume_that_exists(request.source_volume_id, "source volume")
        if vid.kind == V.KIND_SNAPSHOT:
            raise InvalidArgument(f"volume {request.source_volume_id!r} is a read-only volume of a snapshot, "
                                  "which never changes: use that snapshot instead of a snapshot of it")
        bucket = P.parse_snapshot(request.parameters, vid.backend)
        if not bucket and vid.owns_bucket:
            raise InvalidArgument(
                f"volume {request.source_volume_id!r} is a bucket of its own, and DeleteVolume deletes that bucket: "
                "set parameters.bucket in the VolumeSnapshotClass to a bucket for snapshots"
            )
        if vid.owns_bucket and bucket == vid.bucket:
            raise InvalidArgument(
                f"snapshot bucket {bucket!r} is the source volume's own bucket, which DeleteVolume deletes: "
                "use another bucket for snapshots"
            )
        sid = V.SnapshotId(vid.backend, bucket or vid.bucket, S.folder_for(request.name), vid.endpoint, vid.region)
        with self.locks.hold(f"snapshot/{sid}"):
            root = _store(sid, request.secrets)
            self._remember(sid)
            existing = self._header(root, sid)
            if existing is not None:
                if existing.source_volume_id != request.source_volume_id or existing.name != request.name:
                    raise AlreadyExists(
                        f"snapshot {request.name} already exists of volume {existing.source_volume_id!r}, "
                        f"not of {request.source_volume_id!r}: choose another name"
                    )
                return csi_pb2.CreateSnapshotResponse(snapshot=_snapshot_pb(sid, existing))
            manifest = self._take(root, sid, vid, request)
        log.info("snapshot %s of %s: %d objects, %d bytes", request.name, request.source_volume_id,
                 manifest.count, manifest.size_bytes)
        return csi_pb2.CreateSnapshotResponse(snapshot=_snapshot_pb(sid, manifest))

    def _take(self, root: BlockingStore, sid: V.SnapshotId, vid: V.VolumeId,
              request: csi_pb2.CreateSnapshotRequest) -> S.Manifest:
        src = root if sid.bucket == vid.bucket else _store(vid, request.secrets)
        # Pinning versions needs them kept where DeleteVolume leaves them: the source volume's
        # bucket, when it is the snapshot root (a prefix volume), and keeps versions.
        if src is root and _call(f"read the versioning of bucket {vid.bucket}", root.keeps_versions):
            return self._pin(root, sid, vid, request)
        objects = _list_source(src, vid, request.source_volume_id)
        data = sid.prefix + S.DATA
        manifest = S.Manifest(request.name, request.source_volume_id, time.time(), data=data)
        try:
            manifest.entries = S.copy_all(root, S.jobs_for(objects, vid.bucket, vid.prefix, data), CONTROLLER_RETRY,
                                          follow=src)
        except store_errors.StoreError as e:
            # No manifest was written, so there is no snapshot: the copies made so far go too.
            S.cleanup(root, data)
            what = f"snapshot {request.name}: copy the volume's objects (nothing kept; retry)"
            raise from_store_error(e, what) from None
        manifest.count = len(manifest.entries)
        manifest.size_bytes = sum(e.size for e in manifest.entries)
        body = manifest.dumps()
        # A failed manifest PUT keeps the copies: its answer may be lost after it landed, and a
        # retry finds either the manifest (done) or the copies to overwrite.
        _call(f"write the manifest of snapshot {request.name}", lambda: root.put(sid.prefix + S.MANIFEST, body))
        return manifest

    @staticmethod
    def _pin(root: BlockingStore, sid: V.SnapshotId, vid: V.VolumeId, request: csi_pb2.CreateSnapshotRequest
             ) -> S.Manifest:
        """A snapshot of a volume whose bucket keeps versions: a manifest of the current version
        ids (one ListObjectVersions pass), no copies."""
        objects = _list_source(root, vid, request.source_volume_id, versions=True)
        entries = [S.Entry(o.key[len(vid.prefix):], o.size, o.version, o.version) for o in objects]
        manifest = S.Manifest(request.name, request.source_volume_id, time.time(), sum(o.size for o in objects),
                              len(entries), entries, data=vid.prefix)
        body = manifest.dumps()
        _call(f"write the manifest of snapshot {request.name}", lambda: root.put(sid.prefix + S.MANIFEST, body))
        return manifest

    @staticmethod
    def _header(root: BlockingStore, sid: V.SnapshotId) -> S.Manifest | None:
        """The snapshot's manifest header, None if it has none (no snapshot, or one being taken)."""
        try:
            return S.read_manifest(root, sid.prefix, CONTROLLER_RETRY, header_only=True)
        except store_errors.BucketNotFoundError:
            raise InvalidArgument(
                f"snapshot bucket {sid.bucket!r} does not exist: create it, or name an existing one in the "
                "VolumeSnapshotClass's parameters.bucket"
            ) from None
        except store_errors.NotFoundError:
            return None
        except store_errors.StoreError as e:
            raise from_store_error(e, f"read the manifest of snapshot {sid}") from None

    def _remember(self, sid: V.SnapshotId) -> None:
        with self._roots_lock:
            self._roots.add((sid.backend, sid.bucket, sid.endpoint, sid.region))

    def DeleteSnapshot(self, request: csi_pb2.DeleteSnapshotRequest, context: grpc.ServicerContext
                       ) -> csi_pb2.DeleteSnapshotResponse:
        sid = _ours_to_delete(request.snapshot_id, "snapshot_id", V.parse_snapshot, V.MalformedSnapshotId)
        if sid is not None:
            self._delete_snapshot(sid, request.secrets)
        return csi_pb2.DeleteSnapshotResponse()

    def _delete_snapshot(self, sid: V.SnapshotId, secrets: Mapping[str, str]) -> None:
        with self.locks.hold(f"snapshot/{sid}"):
            root = _store(sid, secrets)
            try:
                # the markers themselves, not common prefixes (which a versioned bucket may still
                # show for keys that only have delete markers left)
                users = _call(f"list the volumes of snapshot {sid}",
                              lambda: root.list(sid.prefix + S.VOLUMES, None, None, 10)).objects
            except NotFound:
                return  # its bucket is gone: so is the snapshot
            if users:
                names = ", ".join(sorted({u.key[len(sid.prefix + S.VOLUMES):].split("/")[0] for u in users}))
                raise FailedPrecondition(f"snapshot {sid} is in use by read-only volumes made from it ({names}): "
                                         "delete those volumes first")
            try:
                # The manifest first: the snapshot is gone at once, and a retry after a failure
                # below still finds (and deletes) the copies left.
                _call(f"delete the manifest of snapshot {sid}", lambda: root.delete(sid.prefix + S.MANIFEST))
                _call(f"delete the data of snapshot {sid}", lambda: S.delete_prefix(root, sid.prefix, CONTROLLER_RETRY))
            except NotFound:
                pass  # its bucket is gone: so is the snapshot

    def ListSnapshots(self, request: csi_pb2.ListSnapshotsRequest, context: grpc.ServicerContext
                      ) -> csi_pb2.ListSnapshotsResponse:
        """By snapshot ID: that snapshot (the ID says where it is). Otherwise the snapshots in
        the snapshot roots this controller knows: the source volume's bucket, and every root it
        created, deleted or listed a snapshot in since it started (stateless, it cannot know
        more; Kubernetes' external-snapshotter lists by ID only)."""
        if request.max_entries < 0:
            raise InvalidArgument("max_entries must not be negative")
        found: list[tuple[str, S.Manifest]] = []
        if request.snapshot_id:
            try:
                sid = V.parse_snapshot(request.snapshot_id)
            except V.MalformedSnapshotId:
                return csi_pb2.ListSnapshotsResponse()
            try:
                header = self._header(_store(sid, request.secrets), sid)
            except InvalidArgument:
                header = None  # its bucket is gone: so is the snapshot
            if header is not None:
                self._remember(sid)
                found.append((str(sid), header))
        else:
            with self._roots_lock:
                roots = set(self._roots)
            if request.source_volume_id:
                try:
                    vid = V.parse(request.source_volume_id)
                except V.MalformedVolumeId:
                    return csi_pb2.ListSnapshotsResponse()
                roots = {r for r in roots if (r[0], r[2], r[3]) == (vid.backend, vid.endpoint, vid.region)}
                if not vid.owns_bucket:
                    roots.add((vid.backend, vid.bucket, vid.endpoint, vid.region))
            for backend, bucket, endpoint, region in sorted(roots):
                found += self._list_root(V.SnapshotId(backend, bucket, S.SNAPSHOT_DIR, endpoint, region),
                                         request.secrets)
        if request.source_volume_id:
            found = [(i, m) for i, m in found if m.source_volume_id == request.source_volume_id]
        found.sort(key=lambda f: f[0])
        # The token is the ID of the next snapshot to return: stable while others come and go.
        if request.starting_token:
            found = [f for f in found if f[0] >= request.starting_token]
        next_token = ""
        if request.max_entries and len(found) > request.max_entries:
            next_token = found[request.max_entries][0]
            found = found[:request.max_entries]
        entries = [csi_pb2.ListSnapshotsResponse.Entry(snapshot=_snapshot_pb(V.parse_snapshot(i), m))
                   for i, m in found]
        return csi_pb2.ListSnapshotsResponse(entries=entries, next_token=next_token)

    def _list_root(self, root_id: V.SnapshotId, secrets: Mapping[str, str]) -> list[tuple[str, S.Manifest]]:
        """Every complete snapshot under one root: one LIST, then the header bytes of each
        manifest (a folder without one is a snapshot being taken, or a failed one)."""
        root = _store(root_id, secrets)
        out: list[tuple[str, S.Manifest]] = []
        try:
            folders = list(S.iter_snapshot_folders(root, CONTROLLER_RETRY))
        except (store_errors.BucketNotFoundError, store_errors.AccessDeniedError) as e:
            log.info("snapshot root %s is not readable with these secrets (%s): skipped", root_id.bucket, e)
            return out
        except store_errors.StoreError as e:
            raise from_store_error(e, f"list the snapshots in bucket {root_id.bucket}") from None
        for folder in folders:
            sid = V.SnapshotId(root_id.backend, root_id.bucket, folder, root_id.endpoint, root_id.region)
            header = self._header(root, sid)
            if header is not None:
                out.append((str(sid), header))
        return out

    # -- the rest ------------------------------------------------------------------------------
    def ValidateVolumeCapabilities(self, request: csi_pb2.ValidateVolumeCapabilitiesRequest,
                                   context: grpc.ServicerContext) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        if not request.volume_capabilities:
            raise InvalidArgument("volume_capabilities are required")
        vid = _volume_that_exists(request.volume_id)
        store = _store(vid, request.secrets)
        try:
            _call(f"read volume marker in {vid.bucket}", lambda: store.head(vid.prefix + MARKER))
        except NotFound:
            raise NotFound(f"volume {request.volume_id!r} does not exist") from None
        try:
            for i, cap in enumerate(request.volume_capabilities):
                mode = P.check_capability(cap, f"volume_capabilities[{i}]")
                if vid.kind == V.KIND_SNAPSHOT and not P.is_reader_only(mode):
                    raise InvalidArgument(f"volume_capabilities[{i}]: a volume of a snapshot is read-only")
            P.parse(request.parameters)
        except CsiError as e:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=e.message)
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context, volume_capabilities=request.volume_capabilities,
            parameters=request.parameters,
        )
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    def ControllerExpandVolume(self, request: csi_pb2.ControllerExpandVolumeRequest,
                               context: grpc.ServicerContext) -> csi_pb2.ControllerExpandVolumeResponse:
        """Object storage has no size: expansion records the new capacity in the marker, so the
        PVC's resize completes and the CO sees what it asked for. Nothing to do on the node."""
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        if not (request.capacity_range.required_bytes or request.capacity_range.limit_bytes):
            raise InvalidArgument("capacity_range is required")
        capacity = self._capacity(request.capacity_range)
        vid = _volume_that_exists(request.volume_id)
        with self.locks.hold(f"expand/{request.volume_id}"):
            store = _store(vid, request.secrets)
            key = vid.prefix + MARKER
            marker = self._read_marker(store, key, request.volume_id)
            if int(marker.get("capacity", 0)) < capacity:
                marker["capacity"] = capacity
                body = json.dumps(marker).encode()
                _call(f"update volume marker of {marker.get('name')}", lambda: store.put(key, body))
            current = int(marker["capacity"]) if "capacity" in marker else capacity
        return csi_pb2.ControllerExpandVolumeResponse(capacity_bytes=current, node_expansion_required=False)

    @staticmethod
    def _read_marker(store: BlockingStore, key: str, volume_id: str) -> dict[str, Any]:
        try:
            info = _call("read volume marker", lambda: store.head(key))
        except NotFound:
            raise NotFound(f"volume {volume_id!r} does not exist") from None
        raw = _call("read volume marker", lambda: store.get_range(key, 0, info.size))
        try:
            marker = json.loads(raw)
        except ValueError:
            raise Internal(f"volume marker {key} is not valid JSON") from None
        if not isinstance(marker, dict):
            raise Internal(f"volume marker {key} is not a JSON object")
        return marker

    def ControllerGetCapabilities(self, request: csi_pb2.ControllerGetCapabilitiesRequest,
                                  context: grpc.ServicerContext) -> csi_pb2.ControllerGetCapabilitiesResponse:
        rpc = csi_pb2.ControllerServiceCapability.RPC
        types = (rpc.CREATE_DELETE_VOLUME, rpc.EXPAND_VOLUME, rpc.CREATE_DELETE_SNAPSHOT, rpc.LIST_SNAPSHOTS,
                 rpc.CLONE_VOLUME)
        caps = [csi_pb2.ControllerServiceCapability(rpc=rpc(type=t)) for t in types]
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=caps)


