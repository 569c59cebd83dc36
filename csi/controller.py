"""CSI Controller service: dynamic provisioning without local state.

Two provisioning modes, chosen by the StorageClass parameters:
- with ``bucket``: each volume is the prefix ``<prefix>/<volume name>/`` in that bucket;
- without: each volume is a bucket of its own, named validly from the volume name.

What the controller must remember lives in the store: a small marker object
``.objfs-volume.json`` in the volume's prefix holds the volume name and capacity (for idempotent
CreateVolume) and proves that DeleteVolume deletes a volume we created, never data that a forged
or mistyped ID points at.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import grpc

from fusefs import errors as store_errors
from fusefs.config import ConfigError, MountConfig, Tuning, normalize_prefix
from fusefs.retry import RetryPolicy, call_sync
from fusefs.store import BlockingStore, open_store

from . import params as P
from . import volume_id as V
from .errors import AlreadyExists, CsiError, Internal, InvalidArgument, NotFound, OutOfRange, from_store_error
from .state import KeyedLocks
from .v1 import csi_pb2, csi_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

MARKER = ".objfs-volume.json"
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


def _store(vid: V.VolumeId, secrets: Mapping[str, str]) -> BlockingStore:
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


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self) -> None:
        self.locks = KeyedLocks()

    # -- CreateVolume --------------------------------------------------------------------------
    def CreateVolume(self, request: csi_pb2.CreateVolumeRequest, context: grpc.ServicerContext
                     ) -> csi_pb2.CreateVolumeResponse:
        if not request.name:
            raise InvalidArgument("name is required")
        if not request.volume_capabilities:
            raise InvalidArgument("volume_capabilities are required")
        for i, cap in enumerate(request.volume_capabilities):
            P.check_capability(cap, f"volume_capabilities[{i}]")
        if request.HasField("volume_content_source"):
            raise InvalidArgument("volume_content_source is not supported: objfs cannot clone or restore snapshots")
        capacity = self._capacity(request.capacity_range)
        p = P.parse(request.parameters)
        vid = self._volume_id(request.name, p)
        with self.locks.hold(f"create/{request.name}"):
            store = _store(vid, request.secrets)
            if vid.owns_bucket:
                _call(f"create bucket {vid.bucket}", store.create_bucket)
            else:
                _call(f"check bucket {vid.bucket}", lambda: store.check_access())  # type: ignore[call-arg]
            self._mark(store, vid, request.name, capacity)
        context_out = {k: v for k, v in P.user_keys(request.parameters).items() if k not in P.LOCATION_KEYS}
        log.info("volume %s is %s", request.name, vid)
        return csi_pb2.CreateVolumeResponse(
            volume=csi_pb2.Volume(volume_id=str(vid), capacity_bytes=capacity, volume_context=context_out)
        )

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
    def _mark(store: BlockingStore, vid: V.VolumeId, name: str, capacity: int) -> None:
        key = vid.prefix + MARKER
        try:
            info = _call(f"read volume marker of {name}", lambda: store.head(key))
        except NotFound:
            body = json.dumps({"name": name, "capacity": capacity, "created": time.time()}).encode()
            _call(f"write volume marker of {name}", lambda: store.put(key, body))
            return
        raw = _call(f"read volume marker of {name}", lambda: store.get_range(key, 0, info.size))
        try:
            marker = json.loads(raw)
        except ValueError:
            raise AlreadyExists(f"{vid.bucket}/{key} exists but is not an objfs volume marker") from None
        if marker.get("name") != name:
            raise AlreadyExists(f"{vid.bucket}/{vid.prefix} already belongs to volume {marker.get('name')!r}")
        if int(marker.get("capacity", 0)) != capacity:
            raise AlreadyExists(
                f"volume {name} already exists with capacity {marker.get('capacity')} bytes, not {capacity}"
            )

    # -- DeleteVolume --------------------------------------------------------------------------
    def DeleteVolume(self, request: csi_pb2.DeleteVolumeRequest, context: grpc.ServicerContext
                     ) -> csi_pb2.DeleteVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        try:
            vid = V.parse(request.volume_id)
        except V.MalformedVolumeId:
            # Not one of ours: nothing of ours to delete (the CSI spec wants OK for gone volumes).
            log.info("DeleteVolume of foreign or malformed ID %r: nothing to do", request.volume_id)
            return csi_pb2.DeleteVolumeResponse()
        with self.locks.hold(f"delete/{request.volume_id}"):
            store = _store(vid, request.secrets)
            marker = vid.prefix + MARKER
            try:
                _call(f"read volume marker in {vid.bucket}", lambda: store.head(marker))
            except NotFound:
                return csi_pb2.DeleteVolumeResponse()  # already deleted (or never ours)
            self._delete_prefix(store, vid.prefix, keep=marker)
            _call(f"delete {marker}", lambda: store.delete(marker))
            if vid.owns_bucket:
                try:
                    _call(f"delete bucket {vid.bucket}", store.delete_bucket)
                except NotFound:
                    pass
        return csi_pb2.DeleteVolumeResponse()

    @staticmethod
    def _delete_prefix(store: BlockingStore, prefix: str, keep: str) -> None:
        token: str | None = None
        while True:
            page = _call(f"list {prefix}", lambda t=token: store.list(prefix, None, t, 1000))  # type: ignore[misc]
            for obj in page.objects:
                if obj.key != keep:
                    _call(f"delete {obj.key}", lambda k=obj.key: store.delete(k))  # type: ignore[misc]
            token = page.next_token
            if not token:
                return

    # -- the rest ------------------------------------------------------------------------------
    def ValidateVolumeCapabilities(self, request: csi_pb2.ValidateVolumeCapabilitiesRequest,
                                   context: grpc.ServicerContext) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        if not request.volume_capabilities:
            raise InvalidArgument("volume_capabilities are required")
        try:
            vid = V.parse(request.volume_id)
        except V.MalformedVolumeId:
            raise NotFound(f"volume {request.volume_id!r} does not exist (not an objfs volume ID)") from None
        store = _store(vid, request.secrets)
        try:
            _call(f"read volume marker in {vid.bucket}", lambda: store.head(vid.prefix + MARKER))
        except NotFound:
            raise NotFound(f"volume {request.volume_id!r} does not exist") from None
        try:
            for i, cap in enumerate(request.volume_capabilities):
                P.check_capability(cap, f"volume_capabilities[{i}]")
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
        try:
            vid = V.parse(request.volume_id)
        except V.MalformedVolumeId:
            raise NotFound(f"volume {request.volume_id!r} does not exist (not an objfs volume ID)") from None
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
        types = (rpc.CREATE_DELETE_VOLUME, rpc.EXPAND_VOLUME)
        caps = [csi_pb2.ControllerServiceCapability(rpc=rpc(type=t)) for t in types]
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=caps)


