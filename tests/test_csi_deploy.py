"""The deploy manifests say what the driver needs, and their volume parameters are ones it accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from csi import params as P

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind(kind: str, folder: Path = DEPLOY) -> list[dict[str, Any]]:
    return [d for p in sorted(folder.glob("*.yaml")) if p.name != "kustomization.yaml" for d in docs(p)
            if d["kind"] == kind]


def test_kustomizations_list_every_manifest() -> None:
    for folder in (DEPLOY, DEPLOY / "examples"):
        listed = set(yaml.safe_load((folder / "kustomization.yaml").read_text())["resources"])
        present = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
        assert listed == present, folder


def test_csidriver() -> None:
    (driver,) = by_kind("CSIDriver")
    spec = driver["spec"]
    assert driver["metadata"]["name"] == "objfs.csi.dev"
    assert spec["podInfoOnMount"] is True and spec["requiresRepublish"] is False
    assert spec["attachRequired"] is False and spec["fsGroupPolicy"] == "File"
    assert set(spec["volumeLifecycleModes"]) == {"Persistent", "Ephemeral"}


def test_node_daemonset_is_privileged_with_bidirectional_propagation() -> None:
    (ds,) = by_kind("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    plugin = next(c for c in pod["containers"] if c["name"] == "objfs-csi")
    assert plugin["securityContext"]["privileged"] is True
    assert "--mode=node" in plugin["args"]
    mounts = {m["name"]: m for m in plugin["volumeMounts"]}
    assert mounts["kubelet-pods"]["mountPropagation"] == "Bidirectional"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dev-fuse"]["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    assert volumes["objfs-cache"]["hostPath"]["path"] == "/var/lib/objfs/cache"
    assert volumes["objfs-state"]["hostPath"]["path"] == "/var/lib/objfs/state"
    assert any("node-driver-registrar" in c["image"] for c in pod["containers"])


def test_controller_has_the_provisioner_sidecar() -> None:
    (dep,) = by_kind("Deployment")
    containers = dep["spec"]["template"]["spec"]["containers"]
    prov = next(c for c in containers if "csi-provisioner" in c["image"])
    assert "--extra-create-metadata" in prov["args"]
    plugin = next(c for c in containers if c["name"] == "objfs-csi")
    assert "--mode=controller" in plugin["args"]


def test_example_parameters_are_accepted() -> None:
    examples = DEPLOY / "examples"
    for sc in by_kind("StorageClass", examples):
        assert sc["provisioner"] == "objfs.csi.dev"
        P.parse(sc["parameters"])
    for pv in by_kind("PersistentVolume", examples):
        assert P.parse(pv["spec"]["csi"]["volumeAttributes"]).bucket
    for pod in by_kind("Pod", examples):
        for vol in pod["spec"]["volumes"]:
            assert P.parse(vol["csi"]["volumeAttributes"]).bucket
    modes = {tuple(pv["spec"]["accessModes"]) for pv in by_kind("PersistentVolume", examples)}
    assert ("ReadOnlyMany",) in modes
