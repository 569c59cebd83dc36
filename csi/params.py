"""Volume parameters and secrets -> MountConfig.

The same keys work as StorageClass ``parameters``, PV ``volumeAttributes`` and inline volume
attributes (the contract that README's "Volumes: parameters, secrets, provisioning" documents). Keys
that kubelet and external-provisioner add
(``csi.storage.k8s.io/...``, and ``storage.kubernetes.io/csiProvisionerIdentity``, which the
provisioner puts into every PV it makes) are ignored; anything else unknown is refused by name, because a
typo (``readOnly``, ``metadataTtl``) silently ignored would be worse.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

from csi.errors import FailedPrecondition, InvalidArgument
from csi.v1 import csi_pb2
from fusefs.config import (
    BACKENDS,
    DEFAULT_CACHE_SIZE,
    ConfigError,
    Credentials,
    MountConfig,
    bucket_name_problem,
    normalize_prefix,
)

#: the prefixes Kubernetes reserves for the keys it adds to parameters and volume attributes
K8S_PREFIXES = ("csi.storage.k8s.io/", "storage.kubernetes.io/")
EPHEMERAL_KEY = "csi.storage.k8s.io/ephemeral"
KNOWN = ("backend", "bucket", "prefix", "endpoint", "region", "cache", "metadataTTL", "uid", "gid",
         "fileMode", "dirMode", "prefetch", "fileMetadata")
LOCATION_KEYS = ("backend", "bucket", "prefix", "endpoint", "region")
SECRET_KEYS = ("accessKeyID", "secretAccessKey", "sessionToken", "serviceAccountJSON")


@dataclass(frozen=True)
class VolumeParams:
    backend: str = "s3"
    bucket: str = ""
    prefix: str = ""
    endpoint: str = ""
    region: str = ""
    cache: bool = True
    metadata_ttl: float = 60.0
    uid: int = 0
    gid: int = 0
    file_mode: int = 0o644
    dir_mode: int = 0o755
    prefetch: tuple[str, ...] = ()
    file_metadata: bool = False


def user_keys(parameters: Mapping[str, str]) -> dict[str, str]:
    """The parameters without the keys Kubernetes adds."""
    return {k: v for k, v in parameters.items() if not k.startswith(K8S_PREFIXES)}


def parse(parameters: Mapping[str, str]) -> VolumeParams:
    """Validate and convert; raises InvalidArgument naming the offending key."""
    given = user_keys(parameters)
    unknown = sorted(set(given) - set(KNOWN))
    if unknown:
        raise InvalidArgument(
            f"unknown volume parameter(s) {', '.join(unknown)}: known are {', '.join(KNOWN)}"
        )
    p = VolumeParams()
    backend = given.get("backend", "s3") or "s3"
    if backend not in BACKENDS:
        raise InvalidArgument(f"backend {backend!r} is not supported: use one of {', '.join(BACKENDS)}")
    bucket = given.get("bucket", "")
    problem = bucket_name_problem(backend, bucket) if bucket else None
    if problem:
        raise InvalidArgument(f"bucket {bucket!r} is not a valid bucket name: {problem}")
    try:
        prefix = normalize_prefix(given.get("prefix", ""))
    except ConfigError as e:
        raise InvalidArgument(f"parameter prefix: {e}") from None
    endpoint = given.get("endpoint", "")
    if endpoint and not re.match(r"^https?://[^\s/]+(/\S*)?$", endpoint):
        raise InvalidArgument(f"endpoint {endpoint!r} must be an http:// or https:// URL")
    cache = given.get("cache", "node")
    if cache not in ("node", "none"):
        raise InvalidArgument(f"cache {cache!r} must be 'node' or 'none'")
    file_metadata = given.get("fileMetadata", "false").lower()
    if file_metadata not in ("true", "false"):
        raise InvalidArgument(f"fileMetadata {given['fileMetadata']!r} must be 'true' (each file keeps its own "
                              "mtime, mode and owner in the store) or 'false' (the volume's uid/gid/fileMode)")
    p = replace(
        p, file_metadata=file_metadata == "true",
        backend=backend, bucket=bucket, prefix=prefix, endpoint=endpoint, region=given.get("region", ""),
        cache=cache == "node",
        metadata_ttl=_number(given, "metadataTTL", p.metadata_ttl),
        uid=_int(given, "uid", p.uid, 10), gid=_int(given, "gid", p.gid, 10),
        file_mode=_int(given, "fileMode", p.file_mode, 8), dir_mode=_int(given, "dirMode", p.dir_mode, 8),
        prefetch=tuple(g.strip() for g in given.get("prefetch", "").split(",") if g.strip()),
    )
    for glob in p.prefetch:
        if glob.startswith("/") or ".." in glob.split("/"):
            raise InvalidArgument(f"prefetch pattern {glob!r} must be relative to the volume, without '..'")
    return p


SNAPSHOT_KNOWN = ("bucket",)


def parse_snapshot(parameters: Mapping[str, str], backend: str) -> str:
    """VolumeSnapshotClass parameters: the bucket snapshots go to ('' for the default: the
    source volume's bucket). Unknown keys are refused by name, as for volumes."""
    given = user_keys(parameters)
    unknown = sorted(set(given) - set(SNAPSHOT_KNOWN))
    if unknown:
        raise InvalidArgument(
            f"unknown snapshot parameter(s) {', '.join(unknown)}: known is {', '.join(SNAPSHOT_KNOWN)}"
        )
    bucket = given.get("bucket", "")
    problem = bucket_name_problem(backend, bucket) if bucket else None
    if problem:
        raise InvalidArgument(f"snapshot parameter bucket {bucket!r} is not a valid bucket name: {problem}")
    return bucket


def _number(given: Mapping[str, str], key: str, default: float) -> float:
    if key not in given:
        return default
    try:
        v = float(given[key].rstrip("s"))
    except ValueError:
        raise InvalidArgument(f"{key} {given[key]!r} must be a number of seconds") from None
    if v < 0:
        raise InvalidArgument(f"{key} must not be negative")
    return v


def _int(given: Mapping[str, str], key: str, default: int, base: int) -> int:
    if key not in given:
        return default
    try:
        v = int(given[key], base)
    except ValueError:
        kind = "an octal mode like 0644" if base == 8 else "a non-negative integer"
        raise InvalidArgument(f"{key} {given[key]!r} must be {kind}") from None
    limit = 0o7777 if base == 8 else 2**32 - 1
    if not 0 <= v <= limit:
        raise InvalidArgument(f"{key} {given[key]!r} is out of range")
    return v


def credentials(secrets: Mapping[str, str], backend: str) -> Credentials:
    """Credentials from the request's secrets; none given means the SDK's standard chain."""
    if backend == "gcs":
        return Credentials(service_account_json=secrets.get("serviceAccountJSON") or None)
    key, secret = secrets.get("accessKeyID") or None, secrets.get("secretAccessKey") or None
    if bool(key) != bool(secret):
        raise InvalidArgument("secrets must hold both accessKeyID and secretAccessKey, or neither")
    return Credentials(access_key_id=key, secret_access_key=secret, session_token=secrets.get("sessionToken") or None)


def is_inline(context: Mapping[str, str]) -> bool:
    """An inline (CSI ephemeral) volume: kubelet says so in the volume context (podInfoOnMount)."""
    return context.get(EPHEMERAL_KEY) == "true"


def has_explicit_credentials(creds: Credentials, backend: str) -> bool:
    """False when the store would be reached with the SDK's default chain (the node's identity)."""
    return bool(creds.service_account_json if backend == "gcs" else creds.access_key_id)


@dataclass(frozen=True)
class InlinePolicy:
    """What an inline volume may do on this node. Any pod author writes inline volumes, with no
    administrator in between (StorageClasses and PVs are cluster objects), so by default they must bring
    their own credentials (a nodePublishSecretRef) and cannot point the node at another endpoint.

    ``allow_node_identity``: inline volumes without a secret may use the node's own cloud identity (the
    SDK's default chain: instance role, workload identity, the plugin's environment).
    ``buckets``: globs of the buckets inline volumes may name (default: any; access is then the
    secret's). ``endpoints``: the ``endpoint`` values they may set (exact URLs, or ``*``; default none).
    """

    allow_node_identity: bool = False
    buckets: tuple[str, ...] = ("*",)
    endpoints: tuple[str, ...] = ()

    @classmethod
    def from_flags(cls, allow_node_identity: bool, buckets: str, endpoints: str) -> InlinePolicy:
        def split(text: str) -> tuple[str, ...]:
            return tuple(x.strip() for x in text.split(",") if x.strip())

        return cls(allow_node_identity, split(buckets), tuple(e.rstrip("/") for e in split(endpoints)))

    def check(self, p: VolumeParams, creds: Credentials) -> None:
        """FailedPrecondition (naming the flag that would allow it) for what this node refuses."""
        if not any(fnmatch.fnmatchcase(p.bucket, glob) for glob in self.buckets):
            allowed = ", ".join(self.buckets) or "none"
            raise FailedPrecondition(
                f"inline volumes may not mount bucket {p.bucket!r} on this node (allowed: {allowed}): use a "
                "PersistentVolume, or have the administrator add it to the node plugin's --inline-buckets"
            )
        if p.endpoint and "*" not in self.endpoints and p.endpoint.rstrip("/") not in self.endpoints:
            raise FailedPrecondition(
                f"inline volumes may not set endpoint {p.endpoint!r} on this node: use a PersistentVolume or "
                "StorageClass, or have the administrator allow it with the node plugin's --inline-endpoints"
            )
        if not self.allow_node_identity and not has_explicit_credentials(creds, p.backend):
            raise FailedPrecondition(
                "this inline volume has no credentials (no nodePublishSecretRef) and would use the node's own "
                "cloud identity: give it a nodePublishSecretRef, or have the administrator start the node "
                "plugin with --allow-inline-node-identity"
            )


def mount_config(
    p: VolumeParams,
    secrets: Mapping[str, str],
    *,
    read_only: bool,
    cache_dir: str | None,
    cache_size: int = DEFAULT_CACHE_SIZE,
    gid_override: int | None = None,
) -> MountConfig:
    if not p.bucket:
        raise InvalidArgument("no bucket: set the volume attribute 'bucket'")
    try:
        return MountConfig(
            backend=p.backend, bucket=p.bucket, prefix=p.prefix, endpoint_url=p.endpoint or None,
            region=p.region or None, credentials=credentials(secrets, p.backend), read_only=read_only,
            cache_dir=cache_dir if p.cache else None, cache_size=cache_size, metadata_ttl=p.metadata_ttl, uid=p.uid,
            gid=p.gid if gid_override is None else gid_override, file_mode=p.file_mode, dir_mode=p.dir_mode,
            file_metadata=p.file_metadata,
            allow_other=True, prefetch=p.prefetch, fs_name="objfs",
        )
    except ConfigError as e:
        raise InvalidArgument(str(e)) from None


# -- volume capabilities -------------------------------------------------------------------
def check_capability(cap: csi_pb2.VolumeCapability, where: str = "volume capability") -> int:
    """Refuse what objfs cannot serve; return the access mode. Every access mode is served as a
    filesystem; readers-only modes are enforced by mounting read-only (see ``is_reader_only``)."""
    kind = cap.WhichOneof("access_type")
    if kind == "block":
        raise InvalidArgument(f"{where}: block access is not supported: objfs volumes are filesystems (use mount)")
    if kind != "mount":
        raise InvalidArgument(f"{where}: access_type must be mount")
    fs_type = cap.mount.fs_type
    if fs_type and fs_type not in ("objfs", "fuse", "fuse.objfs"):
        raise InvalidArgument(f"{where}: fs_type {fs_type!r} is not supported: leave it empty")
    mode = cap.access_mode.mode
    if mode == csi_pb2.VolumeCapability.AccessMode.UNKNOWN:
        raise InvalidArgument(f"{where}: access_mode is missing or UNKNOWN")
    return int(mode)


READER_ONLY_MODES = (
    csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY,
    csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_READER_ONLY,
)


def is_reader_only(mode: int) -> bool:
    return mode in READER_ONLY_MODES
