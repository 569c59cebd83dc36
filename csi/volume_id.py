"""Volume IDs of dynamically provisioned volumes.

The ID carries everything a later call needs (backend, bucket, prefix, endpoint, region, and
whether the volume owns its bucket), so the controller keeps no local state:

    objfs1:<kind>:<backend>:<bucket>:<prefix>:<endpoint>:<region>

kind is ``b`` (the volume is a bucket of its own), ``p`` (a prefix in a shared bucket) or ``s``
(a read-only view of a snapshot: bucket is the snapshot's, prefix the folder of the volume's
marker, ``.objfs-snapshots/<snapshot>/volumes/<volume>/``; its data is the snapshot's).
Fields are percent-encoded, so ``:`` never appears inside one. Parsing is strict: anything else
is not one of our IDs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

from fusefs.config import BACKENDS, ConfigError, normalize_prefix

VERSION = "objfs1"
KIND_BUCKET = "b"
KIND_PREFIX = "p"
KIND_SNAPSHOT = "s"
_SNAPSHOT_VOLUME_RE = re.compile(r"^(\.objfs-snapshots/[^/]+/)volumes/[^/]+/$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,253}[a-z0-9]$", re.IGNORECASE)
_FIELD_RE = re.compile(r"^[A-Za-z0-9%/._~-]*$")


class MalformedVolumeId(ValueError):
    """The string is not an objfs volume ID."""


@dataclass(frozen=True)
class VolumeId:
    kind: str
    backend: str
    bucket: str
    prefix: str  # normalized: '' or 'a/b/'
    endpoint: str = ""
    region: str = ""

    def __str__(self) -> str:
        fields = [self.bucket, self.prefix, self.endpoint, self.region]
        return ":".join([VERSION, self.kind, self.backend, *(quote(f, safe="/-._~") for f in fields)])

    @property
    def owns_bucket(self) -> bool:
        return self.kind == KIND_BUCKET

    @property
    def snapshot_folder(self) -> str:
        """The folder of the snapshot a ``s`` volume shows ("" for other volumes)."""
        m = _SNAPSHOT_VOLUME_RE.match(self.prefix) if self.kind == KIND_SNAPSHOT else None
        return m.group(1) if m else ""


def parse(text: str) -> VolumeId:
    parts = text.split(":")
    if len(parts) != 7 or parts[0] != VERSION:
        raise MalformedVolumeId(f"{text!r} is not an objfs volume ID")
    _, kind, backend, *encoded = parts
    if kind not in (KIND_BUCKET, KIND_PREFIX, KIND_SNAPSHOT) or backend not in BACKENDS:
        raise MalformedVolumeId(f"{text!r} is not an objfs volume ID (kind or backend)")
    if not all(_FIELD_RE.match(f) for f in encoded):
        raise MalformedVolumeId(f"{text!r} is not an objfs volume ID (bad characters)")
    bucket, prefix, endpoint, region = (unquote(f, errors="strict") for f in encoded)
    if not _BUCKET_RE.match(bucket):
        raise MalformedVolumeId(f"{text!r} is not an objfs volume ID (bucket)")
    try:
        norm = normalize_prefix(prefix)
    except ConfigError as e:
        raise MalformedVolumeId(f"{text!r} is not an objfs volume ID ({e})") from None
    if norm != prefix or (kind == KIND_PREFIX and not prefix) or (
            kind == KIND_SNAPSHOT and not _SNAPSHOT_VOLUME_RE.match(prefix)):
        raise MalformedVolumeId(f"{text!r} is not an objfs volume ID (prefix)")
    if endpoint and not re.match(r"^https?://[^\s/]+(/\S*)?$", endpoint):
        raise MalformedVolumeId(f"{text!r} is not an objfs volume ID (endpoint)")
    return VolumeId(kind, backend, bucket, prefix, endpoint, region)


# -- snapshots -------------------------------------------------------------------------------------
SNAPSHOT_VERSION = "objfs1s"


class MalformedSnapshotId(ValueError):
    """The string is not an objfs snapshot ID."""


@dataclass(frozen=True)
class SnapshotId:
    """Where a snapshot lives, which is all a later call needs:

        objfs1s:<backend>:<bucket>:<prefix>:<endpoint>:<region>

    ``prefix`` is the snapshot's own folder (``.objfs-snapshots/<name>/``): its manifest and
    its data. The source volume is recorded in the manifest, not here."""

    backend: str
    bucket: str
    prefix: str  # normalized, never empty
    endpoint: str = ""
    region: str = ""

    def __str__(self) -> str:
        fields = [self.bucket, self.prefix, self.endpoint, self.region]
        return ":".join([SNAPSHOT_VERSION, self.backend, *(quote(f, safe="/-._~") for f in fields)])


def parse_snapshot(text: str) -> SnapshotId:
    parts = text.split(":")
    if len(parts) != 6 or parts[0] != SNAPSHOT_VERSION or parts[1] not in BACKENDS:
        raise MalformedSnapshotId(f"{text!r} is not an objfs snapshot ID")
    # The same field rules as a volume ID of a prefix volume.
    try:
        vid = parse(":".join([VERSION, KIND_PREFIX, *parts[1:]]))
    except MalformedVolumeId:
        raise MalformedSnapshotId(f"{text!r} is not an objfs snapshot ID") from None
    return SnapshotId(vid.backend, vid.bucket, vid.prefix, vid.endpoint, vid.region)
