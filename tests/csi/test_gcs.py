"""The GCS backend through the CSI plugin, against fake-gcs-server: a bucket per volume, a
publish, a read and a write, DeleteVolume."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.v1 import csi_pb2 as pb
from fusefs import kernel
from testing.plugin import Client, PluginDirs, in_process_plugin
from testing.servers import FakeGCS

pytestmark = [pytest.mark.fuse, pytest.mark.gcs]
Mode = pb.VolumeCapability.AccessMode


@pytest.fixture(scope="module")
def gcs() -> Iterator[FakeGCS]:
    with tempfile.TemporaryDirectory(prefix="objfs-gcs-") as d, FakeGCS(Path(d)) as server:
        yield server


@pytest.fixture
def plugin() -> Iterator[tuple[Client, PluginDirs]]:
    with in_process_plugin("objfs-csi-gcs-", "node-g") as plugin:
        yield plugin


def test_gcs_volume_lifecycle(gcs: FakeGCS, plugin: tuple[Client, PluginDirs]) -> None:
    client, dirs = plugin
    cap = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(),
                              access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))
    vol = client.controller.CreateVolume(pb.CreateVolumeRequest(
        name="pvc-GCS-" + "AB12" * 20, volume_capabilities=[cap],
        parameters={"backend": "gcs", "endpoint": gcs.endpoint})).volume
    bucket_name = vol.volume_id.split(":")[3]
    assert vol.volume_id.startswith("objfs1:b:gcs:") and len(bucket_name) <= 63
    gcs.client().bucket(bucket_name).blob("hello.txt").upload_from_string(b"from gcs")
    parent = Path(dirs.root) / "pods" / "g1" / "volumes" / "kubernetes.io~csi" / "pv-g"
    parent.mkdir(parents=True)
    target = str(parent / "mount")
    client.node.NodePublishVolume(pb.NodePublishVolumeRequest(
        volume_id=vol.volume_id, target_path=target, volume_capability=cap, volume_context=vol.volume_context))
    try:
        with open(os.path.join(target, "hello.txt"), "rb") as f:
            assert f.read() == b"from gcs"
        with open(os.path.join(target, "out.txt"), "wb") as f:
            f.write(b"to gcs")
        assert gcs.client().bucket(bucket_name).blob("out.txt").download_as_bytes() == b"to gcs"
    finally:
        client.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=target))
    assert kernel.find_mount(target) is None and not os.path.exists(target)
    client.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert bucket_name not in [b.name for b in gcs.client().list_buckets()]
