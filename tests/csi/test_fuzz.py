"""Hypothesis-fuzzed CSI requests against a real objfs-csi process: every RPC of the Identity,
Controller, Node (and GroupController) services, with messages built from the CSI protobuf
descriptors — random strings, paths, capabilities, volume contexts, parameters, secrets, mixed with
values that reach deep (the real bucket, endpoint and key pair, valid volume IDs, target paths
under a scratch root) — get OK or a code the CSI spec documents for that RPC, never UNKNOWN or
INTERNAL, and the plugin keeps serving (Probe ready) afterwards.

Documented codes: the spec's general table (INVALID_ARGUMENT for missing or invalid fields,
PERMISSION_DENIED, ABORTED for an operation pending on the volume, UNIMPLEMENTED,
UNAUTHENTICATED) plus each RPC's own table. Every endpoint given is the local rclone server or not
a URL at all, so no request leaves this machine (an empty endpoint would mean AWS).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as D
from google.protobuf import message_factory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csi import params as P
from csi import volume_id as V
from csi.services.controller import ControllerService
from csi.services.identity import IdentityService
from csi.services.node import NodeService
from csi.v1 import csi_pb2 as pb
from testing import figures
from testing.plugin import Client, PluginDirs, PluginProcess, unmount_all_under
from testing.servers import RcloneS3

pytestmark = pytest.mark.fuse

EXAMPLES = int(os.environ.get("OBJFS_FUZZ_EXAMPLES", "200"))
C = grpc.StatusCode
GENERAL = {C.OK, C.INVALID_ARGUMENT, C.PERMISSION_DENIED, C.ABORTED, C.UNIMPLEMENTED, C.UNAUTHENTICATED}
#: per-RPC codes from the CSI spec's error tables (v1.12)
DOCUMENTED: dict[str, set[grpc.StatusCode]] = {
    "CreateVolume": {C.NOT_FOUND, C.ALREADY_EXISTS, C.OUT_OF_RANGE, C.RESOURCE_EXHAUSTED},
    "DeleteVolume": {C.FAILED_PRECONDITION},
    "ControllerPublishVolume": {C.NOT_FOUND, C.ALREADY_EXISTS, C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED},
    "ControllerUnpublishVolume": {C.NOT_FOUND},
    "ValidateVolumeCapabilities": {C.NOT_FOUND},
    "ListVolumes": set(),
    "GetCapacity": set(),
    "ControllerGetCapabilities": set(),
    # NOT_FOUND: a source volume that does not exist (not in v1.12's table; csi-driver-host-path
    # answers the same, as CreateVolume does for a missing content source)
    "CreateSnapshot": {C.ALREADY_EXISTS, C.RESOURCE_EXHAUSTED, C.NOT_FOUND},
    "DeleteSnapshot": {C.FAILED_PRECONDITION},
    "ListSnapshots": set(),
    "ControllerExpandVolume": {C.NOT_FOUND, C.FAILED_PRECONDITION, C.OUT_OF_RANGE},
    "ControllerGetVolume": {C.NOT_FOUND},
    "ControllerModifyVolume": {C.NOT_FOUND, C.OUT_OF_RANGE},
    "NodeStageVolume": {C.NOT_FOUND, C.ALREADY_EXISTS, C.FAILED_PRECONDITION},
    "NodeUnstageVolume": {C.NOT_FOUND},
    "NodePublishVolume": {C.NOT_FOUND, C.ALREADY_EXISTS, C.FAILED_PRECONDITION},
    "NodeUnpublishVolume": {C.NOT_FOUND},
    "NodeGetVolumeStats": {C.NOT_FOUND},
    "NodeExpandVolume": {C.NOT_FOUND, C.FAILED_PRECONDITION, C.OUT_OF_RANGE},
    "NodeGetCapabilities": set(),
    "NodeGetInfo": set(),
    "GetPluginInfo": set(),
    "GetPluginCapabilities": set(),
    "Probe": {C.FAILED_PRECONDITION},
    "GroupControllerGetCapabilities": set(),
    "CreateVolumeGroupSnapshot": {C.ALREADY_EXISTS, C.RESOURCE_EXHAUSTED, C.NOT_FOUND},
    "DeleteVolumeGroupSnapshot": {C.FAILED_PRECONDITION},
    "GetVolumeGroupSnapshot": {C.NOT_FOUND},
}
SERVICES = [s for s in pb.DESCRIPTOR.services_by_name.values()]
METHODS = [(s.name, m) for s in SERVICES for m in s.methods if not m.server_streaming]
CALLS: dict[str, list[str]] = {"calls": [], "codes": []}


class World:
    """What the strategies draw real values from: set once the plugin runs."""

    root = ""
    endpoint = ""
    bucket = ""
    keys: tuple[str, str] = ("", "")


@pytest.fixture(scope="module")
def plugin(s3_server: RcloneS3) -> Iterator[Client]:
    root = tempfile.mkdtemp(prefix="objfs-csi-fuzz-")
    proc = PluginProcess(PluginDirs(root), node_id="fuzz-node")
    World.root = os.path.join(root, "targets")
    World.endpoint = s3_server.endpoint
    World.bucket = s3_server.create_bucket()
    World.keys = (s3_server.access_key, s3_server.secret_key)
    s3_server.client().put_object(Bucket=World.bucket, Key="data/f.txt", Body=b"fuzz")
    client = proc.start()
    try:
        yield client
    finally:
        client.close()
        proc.stop()
        unmount_all_under(root)
        shutil.rmtree(root, ignore_errors=True)


# -- strategies ---------------------------------------------------------------------------------
text = st.text(max_size=40)


@st.composite
def paths(draw: st.DrawFn) -> str:
    """Mostly absolute paths under the scratch root (with odd segments: '.', empty, long, NUL,
    '..' which the plugin must refuse), sometimes relative or empty. Never elsewhere on the host."""
    segment = st.one_of(st.sampled_from(["", ".", "..", "mount", "a b", "x" * 300, "nul\0"]),
                        st.text(st.characters(exclude_characters="/", codec="utf-8"), min_size=1, max_size=20))
    parts = draw(st.lists(segment, min_size=0, max_size=4))
    if ".." not in parts:
        parts = [p for p in parts if p not in ("",)]  # '..'-free paths stay under the root
    kind = draw(st.sampled_from(["under", "under", "under", "relative", "empty"]))
    if kind == "empty":
        return ""
    joined = "/".join(parts)
    return joined if kind == "relative" else World.root + "/" + joined


def volume_ids() -> st.SearchStrategy[str]:
    def real(prefix: str, kind: str) -> str:
        return str(V.VolumeId(kind, "s3", World.bucket, prefix, World.endpoint, ""))

    kinds = st.sampled_from([V.KIND_PREFIX, V.KIND_BUCKET])
    return st.one_of(text, st.sampled_from(["static-vol", "objfs1:p:s3:b:::", "objfs1:x"]),
                     st.builds(real, st.sampled_from(["", "data/", "new/"]), kinds))


def context_maps() -> st.SearchStrategy[dict[str, str]]:
    keys = st.one_of(st.sampled_from([*P.KNOWN, P.EPHEMERAL_KEY, "csi.storage.k8s.io/pod.uid",
                                      "csi.storage.k8s.io/pod.name", "csi.storage.k8s.io/serviceAccount.name"]), text)
    values = st.one_of(text, st.sampled_from(["true", "false", "s3", "gcs", "0", "-1", "0777", "1e9", "nan", "data/",
                                              "../", "/", "99999999999999999999"]),
                       st.builds(lambda: World.bucket))
    endpoint = st.one_of(st.builds(lambda: World.endpoint), st.builds(lambda: World.endpoint + "/"),
                         st.sampled_from(["not a url", "ftp://x", "http://", "127.0.0.1:1"]))

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, str]:
        m = draw(st.dictionaries(keys, values, max_size=6))
        m["endpoint"] = draw(endpoint)  # always: an empty endpoint means AWS, not this machine
        return m

    return build()


def secret_maps() -> st.SearchStrategy[dict[str, str]]:
    real = st.builds(lambda: {"accessKeyID": World.keys[0], "secretAccessKey": World.keys[1]})
    keys = st.one_of(st.sampled_from(P.SECRET_KEYS), text)
    values = st.one_of(text, st.builds(lambda: World.keys[0]), st.builds(lambda: World.keys[1]),
                       st.sampled_from(["{}", "{\"client_email\": 1}", "not json"]))
    return st.one_of(real, st.dictionaries(keys, values, max_size=4))


def for_string(field: D.FieldDescriptor) -> st.SearchStrategy[Any]:
    name = field.name
    if name.endswith("path"):
        return paths()
    if name in ("volume_id", "source_volume_id", "snapshot_id", "group_snapshot_id"):
        return volume_ids()
    if name in ("name", "node_id"):
        return st.one_of(text, st.sampled_from(["fuzz-node", "pvc-1", "x" * 300]))
    return text


def for_field(field: D.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        if field.name in ("secrets",):
            return secret_maps()
        if field.name in ("volume_context", "parameters", "publish_context", "mutable_parameters"):
            return context_maps()
        return st.dictionaries(text, text, max_size=3)
    if field.is_repeated:
        return st.lists(single(field, depth), max_size=3)
    return single(field, depth)


def single(field: D.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    t = field.type
    if t == D.FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    if t == D.FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values] + [999])
    if t == D.FieldDescriptor.TYPE_STRING:
        return for_string(field)
    if t == D.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == D.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=16)
    if t in (D.FieldDescriptor.TYPE_INT64, D.FieldDescriptor.TYPE_SINT64, D.FieldDescriptor.TYPE_SFIXED64):
        return st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, 1, -1, 2**40]))
    if t in (D.FieldDescriptor.TYPE_INT32, D.FieldDescriptor.TYPE_SINT32, D.FieldDescriptor.TYPE_SFIXED32):
        return st.integers(-(2**31), 2**31 - 1)
    if t in (D.FieldDescriptor.TYPE_UINT64, D.FieldDescriptor.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if t in (D.FieldDescriptor.TYPE_UINT32, D.FieldDescriptor.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if t in (D.FieldDescriptor.TYPE_DOUBLE, D.FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, width=32)
    raise AssertionError(f"no strategy for {field.full_name} (type {t})")


def messages(desc: D.Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    cls = message_factory.GetMessageClass(desc)
    if depth > 4:
        return st.just(cls())
    fields = {f.name: st.none() | for_field(f, depth) for f in desc.fields}

    def build(values: dict[str, Any]) -> Any:
        msg = cls()
        for f in desc.fields:
            v = values[f.name]
            if v is None:
                continue
            target = getattr(msg, f.name)
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                target.update(v)
            elif f.is_repeated:
                if f.type == D.FieldDescriptor.TYPE_MESSAGE:
                    for item in v:
                        target.add().CopyFrom(item)
                else:
                    target.extend(v)
            elif f.type == D.FieldDescriptor.TYPE_MESSAGE:
                target.CopyFrom(v)
            else:
                setattr(msg, f.name, v)
        return msg

    return st.fixed_dictionaries(fields).map(build)


#: the RPCs the plugin implements (the rest answer UNIMPLEMENTED): drawn three times as often
SERVED = [(s, m) for s, m in METHODS
          if m.name in {**vars(ControllerService), **vars(NodeService), **vars(IdentityService)}]


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, str, Any]:
    service, method = draw(st.one_of(st.sampled_from(SERVED), st.sampled_from(SERVED), st.sampled_from(SERVED),
                                     st.sampled_from(METHODS)))
    return service, method.name, draw(messages(method.input_type))


# -- the test -----------------------------------------------------------------------------------
def call(client: Client, service: str, method: str, request: Any) -> tuple[grpc.StatusCode, str]:
    stub = {"Identity": client.identity, "Controller": client.controller, "Node": client.node}.get(service)
    if stub is None:  # a service the plugin does not register (GroupController): a raw call
        rpc = client.channel.unary_unary(f"/csi.v1.{service}/{method}",
                                         request_serializer=lambda m: m.SerializeToString(),
                                         response_deserializer=lambda b: b)
    else:
        rpc = getattr(stub, method)
    try:
        rpc(request, timeout=120)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return C.OK, ""


def test_fuzzed_requests_get_documented_codes(plugin: Client) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(calls())
    def one(c: tuple[str, str, Any]) -> None:
        service, method, req = c
        code, details = call(plugin, service, method, req)
        CALLS["calls"].append(method)
        CALLS["codes"].append(code.name)
        allowed = GENERAL | DOCUMENTED.get(method, set())
        assert code in allowed, f"{service}.{method} answered {code.name}: {details}\n{req}"

    try:
        one()
    finally:
        codes: dict[str, int] = {}
        for name in CALLS["codes"]:
            codes[name] = codes.get(name, 0) + 1
        methods = len(set(CALLS["calls"]))
        pairs = zip(CALLS["calls"], CALLS["codes"], strict=True)
        published = sum(m == "NodePublishVolume" and c == "OK" for m, c in pairs)
        figures.note(f"FUZZ inputs={len(CALLS['calls'])} rpcs={methods} publishes_ok={published} codes="
                     + ",".join(f"{k}:{v}" for k, v in sorted(codes.items())))
    # still serving: Probe ready, and a real publish of a good request works and is torn down
    assert plugin.identity.Probe(pb.ProbeRequest(), timeout=30).ready.value
    target = os.path.join(World.root, "after-fuzz", "mount")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    mode = pb.VolumeCapability.AccessMode(mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY)
    plugin.node.NodePublishVolume(pb.NodePublishVolumeRequest(
        volume_id="after-fuzz", target_path=target, readonly=True,
        volume_capability=pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(), access_mode=mode),
        volume_context={"bucket": World.bucket, "endpoint": World.endpoint},
        secrets={"accessKeyID": World.keys[0], "secretAccessKey": World.keys[1]}), timeout=120)
    try:
        with open(os.path.join(target, "data", "f.txt"), "rb") as f:
            assert f.read() == b"fuzz"
    finally:
        plugin.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="after-fuzz", target_path=target),
                                        timeout=120)
