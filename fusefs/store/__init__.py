"""Object store backends behind one protocol (see ``base``)."""

from __future__ import annotations

from fusefs.config import MountConfig
from fusefs.store.base import AsyncStore, BlockingStore, ListPage, MultipartUpload, ObjectInfo

__all__ = ["AsyncStore", "BlockingStore", "ListPage", "MultipartUpload", "ObjectInfo", "open_store"]


def open_store(config: MountConfig) -> BlockingStore:
    """The blocking backend for ``config``; SDK modules are imported only when used."""
    if config.backend == "s3":
        from fusefs.store.s3 import S3Store

        return S3Store(
            config.bucket, config.endpoint_url, config.region, config.credentials,
            max_connections=config.tuning.max_concurrent_requests * 2,
            timeout=config.tuning.request_timeout,
        )
    from fusefs.store.gcs import GCSStore

    return GCSStore(
        config.bucket, config.endpoint_url, config.credentials, timeout=config.tuning.request_timeout,
    )
