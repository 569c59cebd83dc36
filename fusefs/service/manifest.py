"""The snapshot manifest: what a snapshot holds, written by the CSI controller (``csi.services.snapshots``)
and read by the data service to serve a read-only volume of a snapshot (``.snapshot``).

JSON lines: a header (name, source volume, creation time, size, count, and ``data``: the key
prefix in the snapshot's bucket under which its objects are), then one line per object: its key
relative to the volume (and to ``data``), its size, the source version that was snapshotted, and
the version a reader pins (``copy``): the ETag of a server-side copy under the snapshot's folder,
or a ``vid:`` version id of the source object itself where the bucket keeps versions (then
``data`` is the source volume's prefix and nothing was copied).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

FORMAT = 1
#: the header line of a manifest fits in this (a volume ID is < 1 KiB)
HEADER_BYTES = 16 * 1024


@dataclass(frozen=True)
class Entry:
    key: str  # relative to the volume's prefix
    size: int
    version: str  # the source version snapshotted
    copy: str  # the version a reader or a restore pins (of the copy, or of the source: ``vid:``)


@dataclass
class Manifest:
    name: str
    source_volume_id: str
    created: float
    size_bytes: int = 0
    count: int = 0
    entries: list[Entry] = field(default_factory=list)
    #: where the objects are: the snapshot's ``data/`` folder (copies) or the source volume's
    #: prefix (pinned versions); "" in a manifest written before pinning existed (= ``data/``)
    data: str = ""

    @property
    def pinned(self) -> bool:
        """Whether the entries are pinned versions of the source's objects (no copies)."""
        return any(e.copy.startswith("vid:") for e in self.entries)

    def dumps(self) -> bytes:
        header = {"objfs_snapshot": FORMAT, "name": self.name, "source_volume_id": self.source_volume_id,
                  "created": self.created, "size_bytes": self.size_bytes, "count": self.count, "data": self.data}
        lines = [json.dumps(header, separators=(",", ":"))]
        lines += [json.dumps({"k": e.key, "s": e.size, "v": e.version, "c": e.copy}, separators=(",", ":"))
                  for e in self.entries]
        return ("\n".join(lines) + "\n").encode()

    @classmethod
    def loads(cls, raw: bytes, header_only: bool = False) -> Manifest:
        """Raises ValueError (or KeyError, TypeError) for anything that is not a manifest of ours."""
        lines = bytes(raw).split(b"\n")
        header = json.loads(lines[0])
        if not isinstance(header, dict) or header.get("objfs_snapshot") != FORMAT:
            raise ValueError("not an objfs snapshot manifest")
        m = cls(str(header["name"]), str(header["source_volume_id"]), float(header["created"]),
                int(header["size_bytes"]), int(header["count"]), data=str(header.get("data", "")))
        if header_only:
            return m
        for line in lines[1:]:
            if line:
                d = json.loads(line)
                m.entries.append(Entry(str(d["k"]), int(d["s"]), str(d["v"]), str(d["c"])))
        if len(m.entries) != m.count:
            raise ValueError(f"manifest lists {len(m.entries)} objects, its header says {m.count}")
        return m
