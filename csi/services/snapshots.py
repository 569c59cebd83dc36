"""Snapshots and clones of volumes, kept in the store alone (the controller keeps no state).

A snapshot is a folder ``.objfs-snapshots/<name>/`` at the root of a bucket (the *snapshot
root*: the source volume's bucket for a volume that is a prefix of a shared bucket, the
VolumeSnapshotClass's ``bucket`` for a volume that is a bucket of its own):

    .objfs-snapshots/<name>/data/<key>        a server-side copy of every object of the volume
                                              (none where the manifest pins versions)
    .objfs-snapshots/<name>/snapshot.json     the manifest (fusefs.service.manifest), written
                                              last with a single PUT
    .objfs-snapshots/<name>/volumes/<vol>/    the marker of each read-only volume of the snapshot

The manifest is the snapshot: it exists whole or not at all, so a snapshot whose copies failed
half-way does not exist (its partial copies are deleted, and whatever that cleanup could not
delete is overwritten by the retry or removed by DeleteSnapshot).

Where the source volume's bucket keeps versions (S3 versioning Enabled) and is also the snapshot
root (a prefix volume), nothing is copied: the manifest pins each object's current version id,
listed in one ListObjectVersions pass, and those versions stay readable whatever later happens
to the volume (DeleteVolume's DELETEs only add delete markers; objfs never deletes a version).
Elsewhere (unversioned buckets, GCS, a bucket-per-volume source whose bucket DeleteVolume
removes) the snapshot owns server-side copies under ``data/``.

A volume made from a snapshot is either writable, a prefix filled by server-side copies (of the
copies or of the pinned versions), so no writable volume shares data with anything; or, where
every access mode it is created with is read-only, a view of the snapshot itself: the data
service serves it from the manifest (``fusefs.service.snapshot``), nothing is copied, and its
marker under ``volumes/`` keeps DeleteSnapshot from removing what it reads.

The folder is outside every provisioned volume's prefix (volume names may not start with
``.objfs-``), so no volume's mount shows it. Only a mount of a whole shared bucket would.

Consistency: each object in a snapshot is one whole version that the volume held during the
snapshot (copies are pinned to the version the listing saw; an object rewritten meanwhile is
copied at its new version, one deleted meanwhile is left out). Objects written while the
snapshot runs are not a single atomic cut across objects: quiesce writers for that.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

from fusefs import errors as store_errors
from fusefs.retry import RetryPolicy, call_sync
from fusefs.service.manifest import HEADER_BYTES, Entry, Manifest
from fusefs.store import BlockingStore, ObjectInfo

log = logging.getLogger(__name__)
T = TypeVar("T")

MARKER = ".objfs-volume.json"
SNAPSHOT_DIR = ".objfs-snapshots/"
RESERVED_NAME_PREFIX = ".objfs-"
MANIFEST = "snapshot.json"
DATA = "data/"
#: volumes made read-only from a snapshot (served through its manifest) each keep a marker in
#: ``<folder>volumes/<volume name>/``: DeleteSnapshot refuses while one is there
VOLUMES = "volumes/"
#: server-side copies in flight per snapshot or clone: each is one short request for the
#: controller (the store moves the bytes), so more than the store's usual read concurrency
COPY_WORKERS = 16
_CLEANUP_POLICY = RetryPolicy(max_attempts=3, max_delay=1.0, deadline=10.0)


def segment(name: str) -> str:
    """A key segment for a CO name: the name where it is a safe one (CO names are), else a slug
    of it with a hash of the whole name."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}", name):
        return name
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:100] or "snapshot"
    return f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"


def folder_for(name: str) -> str:
    """The snapshot's folder under the root."""
    return f"{SNAPSHOT_DIR}{segment(name)}/"


def internal(rel: str) -> bool:
    """Keys in a volume that are objfs's own, not the volume's data: its marker, snapshot
    folders (a bucket root that is also a snapshot root), and GCS upload parts in progress."""
    return rel == MARKER or rel.startswith(SNAPSHOT_DIR) or "/.objfs-uploads/" in "/" + rel


def read_manifest(store: BlockingStore, folder: str, policy: RetryPolicy, header_only: bool = False) -> Manifest:
    """The manifest in ``folder``; store errors as they come (NotFoundError: no such snapshot)."""
    key = folder + MANIFEST
    if header_only:
        raw = call_sync(lambda: store.get_range(key, 0, HEADER_BYTES), policy, f"GET {key}")
        raw = bytes(raw).split(b"\n", 1)[0]
    else:
        info = call_sync(lambda: store.head(key), policy, f"HEAD {key}")
        raw = call_sync(lambda: store.get_range(key, 0, info.size), policy, f"GET {key}")
    try:
        return Manifest.loads(raw, header_only)
    except (ValueError, KeyError, TypeError) as e:
        raise store_errors.StoreError(f"{store.bucket}/{key} is not a valid snapshot manifest: {e}") from None


def list_volume(store: BlockingStore, prefix: str, policy: RetryPolicy, versions: bool = False) -> list[ObjectInfo]:
    """Every data object of the volume at ``prefix``, in one LIST pass (no delimiter, 1,000 a
    page): the listing has each object's size and version, so nothing is asked per object.
    ``versions``: each object's current version id (``vid:``), from ListObjectVersions."""
    out: list[ObjectInfo] = []
    token: str | None = None
    lister = store.list_current_versions if versions else (lambda p, t, n: store.list(p, None, t, n))
    while True:
        page = call_sync(lambda t=token: lister(prefix, t, 1000), policy, f"LIST {prefix}")  # type: ignore[misc]
        out.extend(o for o in page.objects if not internal(o.key[len(prefix):]))
        token = page.next_token
        if not token:
            return out


@dataclass(frozen=True)
class CopyJob:
    src_bucket: str
    src_key: str
    dst_key: str
    size: int
    version: str
    rel: str  # the key relative to the volume, as the manifest records it


def copy_all(store: BlockingStore, jobs: Sequence[CopyJob], policy: RetryPolicy,
             follow: BlockingStore | None = None, workers: int = COPY_WORKERS) -> list[Entry]:
    """Server-side copies into ``store``'s bucket, ``workers`` at a time; stops at the first
    failure (the copies not yet started are not sent) and raises it.

    ``follow``, the source's store (snapshotting a live volume): a source rewritten since the
    listing is copied at its new version, one deleted since is left out. Without it (restoring
    a snapshot, whose data nobody should change) a changed source fails the copy."""
    entries: list[Entry | None] = [None] * len(jobs)
    failed = threading.Event()

    def one(i: int, job: CopyJob) -> None:
        if failed.is_set():
            return
        what = f"COPY {job.src_bucket}/{job.src_key} to {job.dst_key}"
        size, version = job.size, job.version
        try:
            info = call_sync(lambda: store.copy_from(job.src_bucket, job.src_key, job.dst_key, size, version),
                             policy, what)
        except (store_errors.ObjectChangedError, store_errors.NotFoundError) as e:
            if follow is None or isinstance(e, store_errors.BucketNotFoundError):
                raise
            # Rare (the volume changed under the snapshot): ask what is there now, copy that.
            src = _head(follow, job.src_key, policy)
            if src is None:
                log.info("%s was deleted during the snapshot: left out", job.src_key)
                return
            size, version = src.size, src.version
            info = call_sync(lambda: store.copy_from(job.src_bucket, job.src_key, job.dst_key, size, version),
                             policy, what)
        entries[i] = Entry(job.rel, size, version, info.version)

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs))), thread_name_prefix="objfs-copy") as pool:
        futures: list[Future[None]] = [pool.submit(one, i, job) for i, job in enumerate(jobs)]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        errors = [f.exception() for f in done if f.exception() is not None]
        if errors:
            failed.set()
            for f in futures:
                f.cancel()
            raise errors[0]  # type: ignore[misc]
    return [e for e in entries if e is not None]


def _head(store: BlockingStore, key: str, policy: RetryPolicy) -> ObjectInfo | None:
    try:
        return call_sync(lambda: store.head(key), policy, f"HEAD {key}")
    except store_errors.BucketNotFoundError:
        raise
    except store_errors.NotFoundError:
        return None


def delete_prefix(store: BlockingStore, prefix: str, policy: RetryPolicy, keep: Callable[[str], bool] | None = None
                  ) -> int:
    """Delete every object under ``prefix`` except those ``keep`` says (by full key); returns
    how many were kept."""
    kept = 0
    token: str | None = None
    while True:
        page = call_sync(lambda t=token: store.list(prefix, None, t, 1000), policy, f"LIST {prefix}")  # type: ignore[misc]
        for obj in page.objects:
            if keep is not None and keep(obj.key):
                kept += 1
                continue
            call_sync(lambda k=obj.key: store.delete(k), policy, f"DELETE {obj.key}")  # type: ignore[misc]
        token = page.next_token
        if not token:
            return kept


def cleanup(store: BlockingStore, prefix: str) -> None:
    """Best effort, after a failed snapshot or clone: what stays is overwritten by a retry."""
    try:
        delete_prefix(store, prefix, _CLEANUP_POLICY)
    except store_errors.StoreError as e:
        log.warning("could not clean up %s/%s after a failure (a retry overwrites it): %s", store.bucket, prefix, e)


def iter_snapshot_folders(store: BlockingStore, policy: RetryPolicy) -> Iterator[str]:
    """The folders under the snapshot root of ``store``'s bucket (one LIST page per 1,000)."""
    token: str | None = None
    while True:
        page = call_sync(lambda t=token: store.list(SNAPSHOT_DIR, "/", t, 1000), policy, f"LIST {SNAPSHOT_DIR}")  # type: ignore[misc]
        yield from page.prefixes
        token = page.next_token
        if not token:
            return


def jobs_for(objects: Sequence[Any], src_bucket: str, src_prefix: str, dst_prefix: str) -> list[CopyJob]:
    """Copy jobs for listed objects (``ObjectInfo``) of a volume at ``src_prefix``."""
    return [CopyJob(src_bucket, o.key, dst_prefix + o.key[len(src_prefix):], o.size, o.version,
                    o.key[len(src_prefix):]) for o in objects]
