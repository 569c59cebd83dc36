"""What the node cache is keyed by: blocks (``BlockKey``), object versions (``ObjectId``) and tenants.

Every key carries the tenant whose credentials fetched it (``tenant_of``: a hash of the endpoint and the
credentials' principal), so a mount is served only what the same credentials fetched; mounts with
ambient credentials share the tenant "" and prove access once per object version instead
(``fusefs.service.local``). Keys are JSON (unambiguous for any strings, pure ASCII) and appear in file
names only as hashes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from fusefs.config import MountConfig

#: bump when the entry format changes: old entries then simply miss (v2: CRC-32C instead of CRC-32;
#: v3: tenants, block sizes and whole-object data files; v4: each CRC seeded with its block's key)
FORMAT = "v4"


@dataclass(frozen=True)
class ObjectId:
    """One version of one object, as one tenant sees it, filled in blocks of ``block_size``."""

    tenant: str
    store: str
    key: str
    version: str
    block_size: int
    size: int

    def encode(self, fmt: str = FORMAT) -> str:
        return json.dumps([fmt, "obj", self.tenant, self.store, self.key, self.version, self.block_size],
                          separators=(",", ":"))

    def blocks(self) -> int:
        return (self.size + self.block_size - 1) // self.block_size

    def block_length(self, index: int) -> int:
        return max(0, min(self.block_size, self.size - index * self.block_size))

    def name(self, fmt: str = FORMAT) -> str:
        """The file name stem: a hash, so no key, tenant or store ever appears in a path."""
        return hashlib.sha256(self.encode(fmt).encode()).hexdigest()[:40]


@dataclass(frozen=True)
class BlockKey:
    store: str  # AsyncStore.identity, e.g. "s3|http://127.0.0.1:9000|bucket"
    key: str  # object key
    version: str  # ETag / generation pinned at open
    index: int  # block number
    #: the reader's block size: which bytes block ``index`` holds. 0 (or an object no larger than
    #: one block) means the block is the whole object: then it does not depend on the block size.
    block_size: int = 0
    size: int = 0  # the object's size
    #: whose credentials fetched it (``tenant_of``); "" for ambient credentials, whose readers
    #: prove access once per object version instead (``fusefs.service.local``)
    tenant: str = ""

    @property
    def whole(self) -> bool:
        """The block is the whole object: one index entry of its own (``entries.SmallObjects``),
        not a block of a data file (``objectfiles.ObjectFiles``)."""
        return self.block_size <= 0 or self.size <= self.block_size

    def object_id(self) -> ObjectId:
        return ObjectId(self.tenant, self.store, self.key, self.version, self.block_size, self.size)

    @classmethod
    def of(cls, oid: ObjectId, index: int) -> BlockKey:
        """Block ``index`` of the object ``oid`` (the inverse of ``object_id``)."""
        return cls(oid.store, oid.key, oid.version, index, oid.block_size, oid.size, oid.tenant)

    def encode(self) -> str:
        """The index key: unambiguous for any strings (JSON), pure ASCII (lone surrogates escaped)."""
        geometry = [0 if self.whole else self.block_size, self.index]
        return json.dumps([FORMAT, self.tenant, self.store, self.key, self.version, *geometry],
                          separators=(",", ":"))


def tenant_of(config: MountConfig) -> str:
    """The cache namespace of a mount's credentials: a hash of the endpoint and the access key id
    (S3) or service account e-mail (GCS), never of a secret alone; "" for ambient credentials."""
    creds = config.credentials
    principal = creds.access_key_id or ""
    if not principal and creds.service_account_json:
        try:
            principal = str(json.loads(creds.service_account_json).get("client_email") or "")
        except (ValueError, AttributeError):
            principal = ""
        # an unparsable key file still names someone: its hash (the server rejects it anyway)
        principal = principal or "json:" + hashlib.sha256(creds.service_account_json.encode()).hexdigest()
    if not principal:
        return ""
    ident = json.dumps([config.backend, config.endpoint_url or "", principal], separators=(",", ":"))
    return hashlib.sha256(ident.encode()).hexdigest()[:32]
