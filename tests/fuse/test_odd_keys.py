"""Object keys that could escape or confuse the tree: '..', '.', empty segments ('a//b', a leading
'/'), segments over 255 bytes, NUL, a key that is both a file and a prefix ('d' and 'd/x'), keys
outside the prefix that was listed. A real FUSE mount lists and opens only names that stay inside
it, never crashes, and says once per directory what it skipped.

rclone serve s3 refuses most of these keys (its disk cannot hold them: '..', 'a//b', '/lead' are
InvalidArgument, a 300-byte segment or 'd/x' beside the file 'd' fail), as a real S3 bucket would
not; so the keys the store can hold are stored, and the rest are added to its LIST answers by a
rewriting proxy, as a store holding them would list them.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fusefs.config import MountConfig
from testing.fsmount import Mounted
from testing.rewrite_proxy import Headers, RewritingProxy
from testing.scrape import parse, value
from testing.servers import RcloneS3

pytestmark = pytest.mark.fuse

LONG = "x" * 256  # one byte over NAME_MAX
#: stored for real: names any filesystem can show (odd characters included)
STORED = {
    "plain.txt": b"plain",
    "a/ok.txt": b"inside a",
    "d/x": b"under d",  # 'd' is also listed as an object: both a file and a prefix
    "sp ace": b"space",
    "back\\slash": b"backslash",
    "nl\nx": b"newline",
    "tab\tx": b"tab",
    "unicode-\u00e9\u4e2d": b"utf-8",
    "x" * 255: b"exactly 255 bytes",
}
#: added to the store's LIST answers, by the prefix listed: (objects, common prefixes)
INJECTED: dict[str, tuple[list[str], list[str]]] = {
    "": ([".", "..", LONG, "d", "nul\0byte", "other-prefix/evil"],
         ["/", "./", "../", LONG + "/", "nul\0dir/"]),
    "a/": (["a/.", "a/..", "a/" + LONG, "b/evil", "zz"], ["a//", "a/../", "a/./", "elsewhere/"]),
    "a//": (["a//b"], []),
    "../": (["../escape"], []),
}
#: what the hidden-keys metric counts of them, by reason (root and a/ listed)
HIDDEN = {"too_long": 3.0, "invalid": 13.0, "outside": 3.0}
#: what the mount shows
EXPECTED_ROOT = sorted(["plain.txt", "a", "d", "sp ace", "back\\slash", "nl\nx", "tab\tx",
                        "unicode-\u00e9\u4e2d", "x" * 255])


def _xml(text: str, url_encoded: bool) -> str:
    text = urllib.parse.quote(text, safe="/") if url_encoded else text
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def inject_keys(kind: str, headers: Headers, body: bytes) -> tuple[Headers, bytes]:
    if kind != "LIST" or b"<ListBucketResult" not in body:
        return headers, body
    url_encoded = b"<EncodingType>url</EncodingType>" in body
    m = re.search(rb"<Prefix>([^<]*)</Prefix>", body)
    prefix = m.group(1).decode() if m else ""
    if url_encoded:
        prefix = urllib.parse.unquote(prefix)
    objects, prefixes = INJECTED.get(prefix, ([], []))
    if not objects and not prefixes:
        return headers, body
    extra = "".join(
        f"<Contents><Key>{_xml(k, url_encoded)}</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>"
        f"<ETag>&quot;0123456789abcdef0123456789abcdef&quot;</ETag><Size>7</Size>"
        f"<StorageClass>STANDARD</StorageClass></Contents>" for k in objects)
    extra += "".join(f"<CommonPrefixes><Prefix>{_xml(p, url_encoded)}</Prefix></CommonPrefixes>" for p in prefixes)
    body = body.replace(b"</ListBucketResult>", extra.encode() + b"</ListBucketResult>", 1)
    return headers, body


@pytest.fixture
def odd_bucket(s3_server: RcloneS3, s3_config: MountConfig) -> Iterator[MountConfig]:
    client = s3_server.client()
    for key, data in STORED.items():
        client.put_object(Bucket=s3_config.bucket, Key=key, Body=data)
    with RewritingProxy(s3_server.port, inject_keys) as proxy:
        # TTL 0: every listdir lists again, so a warning said per listing would show
        yield dataclasses.replace(s3_config, endpoint_url=proxy.endpoint, metadata_ttl=0.0)


def test_only_names_inside_the_mount_are_shown(
    odd_bucket: MountConfig, mount_fs: Callable[..., Mounted], tmp_path: Path
) -> None:
    m = mount_fs(dataclasses.replace(odd_bucket, metrics_path=str(tmp_path / "figures.prom")))
    root = m.path
    for _ in range(3):  # listed again each time: the same names, the same single warnings
        assert sorted(os.listdir(root)) == EXPECTED_ROOT
        assert os.listdir(root / "a") == ["ok.txt"]
        assert os.listdir(root / "d") == ["x"]
    # every file the walk finds is inside the mount and reads the stored bytes
    seen = {}
    for dirpath, _dirs, filenames in os.walk(root):
        assert os.path.realpath(dirpath).startswith(str(root))
        for name in filenames:
            path = Path(dirpath) / name
            assert os.path.realpath(path).startswith(str(root) + "/")
            seen[str(path.relative_to(root))] = path.read_bytes()
    assert seen == STORED
    # names that are not there, or that no filesystem can hold, fail as they would on a disk
    too_long = {errno.ENOENT, errno.ENAMETOOLONG}  # FUSE passes names up to 1024 bytes to the server
    for name, codes in (("d/..x", {errno.ENOENT}), (LONG, too_long), ("a/" + LONG, too_long),
                        ("zz", {errno.ENOENT}), ("a/zz", {errno.ENOENT}), ("a/evil", {errno.ENOENT}),
                        ("evil", {errno.ENOENT}), ("escape", {errno.ENOENT})):
        with pytest.raises(OSError) as exc:
            os.stat(root / name)
        assert exc.value.errno in codes, name
    assert os.stat(root / "d").st_mode & 0o170000 == 0o040000  # the directory wins over the file 'd'
    assert os.path.samefile(root / "a" / "..", root)
    assert m.proc.poll() is None, m.log_text()
    log = m.log_text()
    # one line per directory that had such keys, however often it was listed
    skipped = [line for line in log.splitlines() if "cannot be shown as file names" in line]
    assert len(skipped) == 2, skipped
    assert sum("both an object and a directory prefix" in line for line in log.splitlines()) == 1
    assert "Traceback" not in log
    # and counted, by reason, once per directory (the server writes its last figures as it leaves)
    m.unmount()
    figures = parse((tmp_path / "figures.prom").read_text())
    hidden = {reason: value(figures, "objfs_hidden_keys_total", reason=reason)
              for reason in ("too_long", "invalid", "outside")}
    assert hidden == HIDDEN, hidden


def test_a_prefix_mount_never_reaches_outside_its_prefix(
    s3_server: RcloneS3, odd_bucket: MountConfig, mount_fs: Callable[..., Mounted]
) -> None:
    """Mounted at prefix 'a/': '..' and 'a//' keys under it give no way to 'a' or the bucket."""
    m = mount_fs(dataclasses.replace(odd_bucket, prefix="a/"))
    assert os.listdir(m.path) == ["ok.txt"]
    assert (m.path / "ok.txt").read_bytes() == b"inside a"
    for name in ("plain.txt", "escape", "b", "evil"):
        assert not (m.path / name).exists()
    assert m.proc.poll() is None, m.log_text()
