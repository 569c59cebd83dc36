"""MountConfig: everything one FUSE server needs, as one frozen, JSON-serialisable value.

It is the seam between the CSI plugin and the filesystem: ``objfs mount`` builds it from flags,
the CSI node plugin builds it from a NodePublishVolume request and hands it to ``objfs serve``
over an inherited pipe (never argv or environment, which other users can read in /proc).
Secrets travel inside it, so ``redacted()`` is what gets logged.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

Backend = Literal["s3", "gcs"]
BACKENDS: tuple[str, ...] = ("s3", "gcs")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
#: the node cache's size limit unless one is given (objfs mount --cache-size, objfs-csi --cache-size)
DEFAULT_CACHE_SIZE = 10 * GiB

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB, "p": 1024 * 1024 * GiB}


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which and what is expected."""


def parse_size(text: str | int) -> int:
    """Parse '512M', '10GiB', '1.5g' or a plain byte count into bytes (binary units)."""
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"size must not be negative, got {text}")
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"malformed size {text!r}: use a number with an optional unit, e.g. 512M or 10G")
    number, unit, suffix = m.groups()
    if not unit and suffix.lower() not in ("", "b"):  # '10i', '10ib': a binary marker without a unit
        raise ConfigError(f"malformed size {text!r}: use a number with an optional unit, e.g. 512M or 10G")
    return int(float(number) * _SIZE_UNITS[unit.lower()])


@dataclass(frozen=True)
class Credentials:
    """Explicit credentials. Absent fields mean: use the SDK's standard chain."""

    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    service_account_json: str | None = None

    def redacted(self) -> dict[str, Any]:
        return {f.name: ("***" if getattr(self, f.name) else None) for f in dataclasses.fields(self)}

    def __repr__(self) -> str:  # never let a secret reach a log through repr()
        return f"Credentials({self.redacted()})"


@dataclass(frozen=True)
class Tuning:
    """Data-path knobs. Defaults are what the benchmarks chose on a 2-core machine."""

    block_size: int = 8 * MiB  # unit of ranged GETs and of the node cache
    max_prefetch_blocks: int = 6  # sequential read window, in blocks
    max_concurrent_requests: int = 16  # store requests in flight per server
    memory_blocks: int = 10  # blocks kept in memory per server: the prefetch window and some (bounds RSS)
    small_file_prefetch: int = 16  # small files fetched ahead of readers at first (fusefs.fs.dirahead; 0: none)
    part_size: int = 8 * MiB  # multipart upload part size
    max_upload_parts_in_flight: int = 8
    readahead_kb: int = 16 * 1024  # kernel readahead for the mount's bdi
    request_timeout: float = 60.0  # one store request
    retry_deadline: float = 30.0  # all retries of one request (a read fails with EIO after it)
    #: open complete node-cache files with FUSE passthrough where the build, kernel and privilege allow
    passthrough: bool = True


#: fields added after the first release, written only when they differ from their default: a
#: running server of an earlier version (a pod's sidecar outlives a plugin upgrade) refuses keys it does
#: not know, so a config that does not use a newer feature must read exactly as before
#: (tests/wire/test_serve_pipe.py and test_handoff.py pin those bytes)
WRITTEN_WHEN_SET: tuple[str, ...] = ("file_metadata", "snapshot")


@dataclass(frozen=True)
class MountConfig:
    backend: str
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    credentials: Credentials = field(default_factory=Credentials)
    read_only: bool = False
    cache_dir: str | None = None
    cache_size: int = DEFAULT_CACHE_SIZE
    metadata_ttl: float = 60.0
    uid: int = 0
    gid: int = 0
    file_mode: int = 0o644
    dir_mode: int = 0o755
    #: each file's own mtime, mode and owner kept in its object's metadata (``fusefs.filemeta``);
    #: off: every file shows the mount-wide uid/gid/file_mode and its store time
    file_metadata: bool = False
    allow_other: bool = False
    prefetch: tuple[str, ...] = ()
    fs_name: str = "objfs"
    tuning: Tuning = field(default_factory=Tuning)
    #: the node plugin's passthrough broker (csi/node/broker.py); "" registers backing files itself (root)
    broker_socket: str = ""
    # Prometheus figures (fusefs.metrics): written to metrics_path every few seconds, served on
    # metrics_address (HOST:PORT, a standalone mount), labelled volume (default: the source) and pod.
    metrics_path: str = ""
    metrics_address: str = ""
    metrics_volume: str = ""
    metrics_pod: str = ""
    #: the key of a snapshot manifest in the bucket (``fusefs.service.manifest``): the volume is
    #: that snapshot, read-only, its objects at the versions the manifest pins, under ``prefix``
    snapshot: str = ""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}: use one of {', '.join(BACKENDS)}")
        if not self.bucket:
            raise ConfigError("no bucket given")
        object.__setattr__(self, "prefix", normalize_prefix(self.prefix))
        if self.snapshot and not self.read_only:
            raise ConfigError("a volume of a snapshot is read-only: set read_only (a snapshot never changes)")
        if self.metadata_ttl < 0:
            raise ConfigError(f"metadata TTL must be >= 0 seconds, got {self.metadata_ttl}")
        for name in ("uid", "gid"):
            v = getattr(self, name)
            if not 0 <= v < 2**32:
                raise ConfigError(f"{name} must be between 0 and 4294967295, got {v}")
        for name in ("file_mode", "dir_mode"):
            v = getattr(self, name)
            if not 0 <= v <= 0o7777:
                raise ConfigError(f"{name} must be an octal permission like 0644, got {oct(v)}")

    @property
    def source(self) -> str:
        scheme = "gs" if self.backend == "gcs" else "s3"
        return f"{scheme}://{self.bucket}/{self.prefix}".rstrip("/")

    def to_json(self) -> str:
        raw = dataclasses.asdict(self)
        for name in WRITTEN_WHEN_SET:
            if raw.get(name) == MountConfig.__dataclass_fields__[name].default:
                del raw[name]
        return json.dumps(raw, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> MountConfig:
        raw = json.loads(text)
        raw["credentials"] = Credentials(**raw.get("credentials") or {})
        raw["tuning"] = Tuning(**raw.get("tuning") or {})
        raw["prefetch"] = tuple(raw.get("prefetch") or ())
        return cls(**raw)

    def server_view(self) -> MountConfig:
        """What a FUSE server that reaches its data through the data service may know: no
        credential, no endpoint, no node path (../shared/DESIGN.md, "Trust boundary")."""
        return dataclasses.replace(self, credentials=Credentials(), endpoint_url=None, region=None, cache_dir=None,
                                   broker_socket="")

    def redacted(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["credentials"] = self.credentials.redacted()
        return d

    def __repr__(self) -> str:
        return f"MountConfig({self.redacted()})"


def normalize_prefix(prefix: str) -> str:
    """'a/b' -> 'a/b/', '' -> ''; refuses '..' and '.' components and empty segments."""
    p = prefix.strip("/")
    if not p:
        return ""
    parts = p.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise ConfigError(f"invalid prefix {prefix!r}: no empty, '.' or '..' path segments allowed")
    return p + "/"


def parse_source(source: str) -> tuple[str, str, str]:
    """'s3://bucket/some/prefix' -> ('s3', 'bucket', 'some/prefix/')."""
    m = re.match(r"^(s3|gs|gcs)://([^/]*)(/.*)?$", source)
    if not m:
        raise ConfigError(
            f"malformed source {source!r}: use s3://BUCKET[/PREFIX] or gs://BUCKET[/PREFIX]"
        )
    scheme, bucket, rest = m.groups()
    if not bucket:
        raise ConfigError(f"no bucket in {source!r}: use s3://BUCKET[/PREFIX] or gs://BUCKET[/PREFIX]")
    backend = "s3" if scheme == "s3" else "gcs"
    problem = bucket_name_problem(backend, bucket)
    if problem:
        raise ConfigError(f"invalid bucket name {bucket!r}: {problem}")
    return backend, bucket, normalize_prefix(rest or "")


_IPV4_RE = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")


def bucket_name_problem(backend: str, name: str) -> str | None:
    """Which naming rule of the backend ``name`` breaks (None if it is valid), in words a user
    can act on. S3: AWS's rules for general purpose buckets. GCS: Google's bucket naming rules."""
    if backend == "gcs":
        return _gcs_bucket_problem(name)
    return _s3_bucket_problem(name)


def _common_problem(name: str, allowed: str, allowed_text: str) -> str | None:
    if any(c not in allowed for c in name):
        bad = next(c for c in name if c not in allowed)
        return f"{bad!r} is not allowed: use only {allowed_text}"
    if not (name[0].isalnum() and name[-1].isalnum()):
        return "it must start and end with a lower-case letter or a digit"
    if _IPV4_RE.match(name):
        return "it must not look like an IP address"
    return None


_S3_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.-"
_GCS_CHARS = _S3_CHARS + "_"


def _s3_bucket_problem(name: str) -> str | None:
    if not 3 <= len(name) <= 63:
        return f"S3 bucket names are 3 to 63 characters long, this one has {len(name)}"
    problem = _common_problem(name, _S3_CHARS, "lower-case letters, digits, '.' and '-' in S3 bucket names")
    if problem:
        return problem
    if ".." in name:
        return "S3 bucket names must not contain two adjacent periods"
    return None


def _gcs_bucket_problem(name: str) -> str | None:
    if "." in name:
        if not 3 <= len(name) <= 222:
            return f"GCS bucket names with dots are 3 to 222 characters long, this one has {len(name)}"
        if any(not 1 <= len(part) <= 63 for part in name.split(".")):
            return "each dot-separated part of a GCS bucket name is 1 to 63 characters long"
    elif not 3 <= len(name) <= 63:
        return f"GCS bucket names are 3 to 63 characters long (222 with dots), this one has {len(name)}"
    problem = _common_problem(name, _GCS_CHARS, "lower-case letters, digits, '.', '-' and '_' in GCS bucket names")
    if problem:
        return problem
    if name.startswith("goog"):
        return "GCS bucket names must not start with 'goog'"
    if "google" in name:
        return "GCS bucket names must not contain 'google'"
    return None
