"""The deploy manifests say what the driver needs, and their volume parameters are ones it accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml

from csi import params as P
from csi.main import parse_args
from csi.webhook import inject as I

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind(kind: str, folder: Path = DEPLOY) -> list[dict[str, Any]]:
    return [d for p in sorted(folder.glob("*.yaml")) if p.name != "kustomization.yaml" for d in docs(p)
            if d["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in by_kind(kind) if d["metadata"]["name"] == name]
    return found


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
    args = parse_args(plugin["args"])
    assert args.mode == "node"
    mounts = {m["name"]: m for m in plugin["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["kubelet-pods"]["mountPropagation"] == "Bidirectional"
    # kubelet names targets by their host paths: the plugin must see them at the same path.
    assert mounts["kubelet-pods"]["mountPath"] == volumes["kubelet-pods"]["hostPath"]["path"] == "/var/lib/kubelet/pods"
    assert volumes["dev-fuse"]["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    assert volumes["objfs-cache"]["hostPath"]["path"] == mounts["objfs-cache"]["mountPath"] == args.cache_dir
    assert volumes["objfs-state"]["hostPath"]["path"] == mounts["objfs-state"]["mountPath"] == args.state_dir
    assert any("node-driver-registrar" in c["image"] for c in pod["containers"])


def test_the_sidecar_is_how_volumes_are_served_by_default() -> None:
    (ds,) = by_kind("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    plugin = next(c for c in pod["containers"] if c["name"] == "objfs-csi")
    args = parse_args(plugin["args"])
    assert args.launcher == "sidecar"
    # A pod without the sidecar is refused with a message saying how to fix it, not served quietly
    # from the plugin's container (where a DaemonSet rollout would break its mount).
    assert args.allow_process_fallback is False
    # The pods' emptyDirs (hand-over sockets) are found under the kubelet root: mounted Bidirectional.
    mounts = {m["mountPath"]: m for m in plugin["volumeMounts"]}
    assert mounts[f"{args.kubelet_root}/pods"]["mountPropagation"] == "Bidirectional"
    # The webhook that adds the sidecar is part of the install, and injects the plugin's own image
    # (its own, read at start-up): sidecar and plugin speak the same hand-over protocol.
    listed = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"]
    assert {"webhook.yaml", "webhook-rbac.yaml"} <= set(listed)
    (hook_container,) = named("Deployment", "objfs-webhook")["spec"]["template"]["spec"]["containers"]
    assert hook_container["image"] == plugin["image"] == "objfs-csi"
    assert parse_args(hook_container["args"]).sidecar_image == ""
    # The plugin may read pods (to let regular-container sidecars exit once a pod's work is done), nothing more.
    binding = named("ClusterRoleBinding", pod["serviceAccountName"])
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": "objfs"}]
    rules = named("ClusterRole", binding["roleRef"]["name"])["rules"]
    assert rules == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]


def test_controller_has_the_provisioner_sidecar() -> None:
    dep = named("Deployment", "objfs-csi-controller")
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


def test_snapshotter_beside_the_provisioner_and_the_snapshot_class_is_accepted() -> None:
    dep = named("Deployment", "objfs-csi-controller")
    containers = {c["name"]: c for c in dep["spec"]["template"]["spec"]["containers"]}
    snap = containers["csi-snapshotter"]
    assert snap["image"].startswith("registry.k8s.io/sig-storage/csi-snapshotter:v8.")
    assert "--csi-address=/csi/csi.sock" in snap["args"]
    rules = named("ClusterRole", "objfs-csi-snapshotter")["rules"]
    assert any("volumesnapshotcontents/status" in r["resources"] for r in rules)
    for vsc in by_kind("VolumeSnapshotClass", DEPLOY / "examples"):
        assert vsc["driver"] == "objfs.csi.dev"
        P.parse_snapshot(vsc["parameters"], "s3")


def test_webhook_is_fail_safe_and_its_flags_match_its_objects() -> None:
    (mwc,) = by_kind("MutatingWebhookConfiguration")
    (hook,) = mwc["webhooks"]
    assert hook["failurePolicy"] == "Ignore" and hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"] and hook["timeoutSeconds"] <= 10
    assert hook["rules"] == [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                              "resources": ["pods"], "scope": "Namespaced"}]
    (expr,) = hook["namespaceSelector"]["matchExpressions"]
    assert (expr["key"], expr["operator"]) == ("kubernetes.io/metadata.name", "NotIn")
    assert {"objfs", "kube-system"} <= set(expr["values"])
    dep = named("Deployment", "objfs-webhook")
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "objfs-webhook" and container["image"] == "objfs-csi"  # the image it injects
    args = parse_args(container["args"])
    assert args.mode == "webhook"
    service = named("Service", args.webhook_service)
    assert hook["clientConfig"]["service"] == {"name": service["metadata"]["name"], "namespace": "objfs",
                                               "path": "/mutate", "port": service["spec"]["ports"][0]["port"]}
    assert service["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert container["ports"][0]["containerPort"] == int(args.webhook_address.rsplit(":", 1)[1])
    assert mwc["metadata"]["name"] == args.webhook_config and "caBundle" not in hook["clientConfig"]
    named("Secret", args.webhook_secret)
    # Its RBAC names exactly those objects.
    rules = named("ClusterRole", pod["serviceAccountName"])["rules"]
    assert {"resourceNames": [args.webhook_config], "verbs": ["get", "patch"]}.items() <= rules[0].items()
    role = named("Role", pod["serviceAccountName"])["rules"]
    assert role[0]["resources"] == ["secrets"] and role[0]["resourceNames"] == [args.webhook_secret]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] and args.cert_dir.startswith(tuple(mounts))


def _pod_templates(folder: Path) -> list[dict[str, Any]]:
    """Every pod an example creates: Pods, and the pod templates of Deployments and Jobs."""
    pods = [d for d in by_kind("Pod", folder)]
    pods += [d["spec"]["template"] for kind in ("Deployment", "Job") for d in by_kind(kind, folder)]
    return pods


@pytest.mark.parametrize("native", [True, False])
def test_every_example_pod_gets_the_sidecar_from_the_webhook(native: bool) -> None:
    examples = DEPLOY / "examples"
    objfs_classes = {sc["metadata"]["name"] for sc in by_kind("StorageClass", examples)}
    objfs_claims = {c["metadata"]["name"] for c in by_kind("PersistentVolumeClaim", examples)
                    if c["spec"].get("storageClassName") in objfs_classes
                    or any(pv["metadata"]["name"] == c["spec"].get("volumeName") for pv in by_kind("PersistentVolume",
                                                                                                      examples))}
    settings = I.SidecarSettings(image="objfs-csi", native=native)
    pods = _pod_templates(examples)
    assert any("objfs.csi.dev/sidecar-memory-limit" in (p["metadata"].get("annotations") or {}) for p in pods)
    for pod in pods:
        decision = I.decide(pod, "default", settings, lambda ns, name: name in objfs_claims, objfs_classes.__contains__)
        assert decision.inject, (pod["metadata"], decision.reason)
        patched = jsonpatch.apply_patch(pod, I.sidecar_patch(pod, settings))
        spec = patched["spec"]
        where = spec["initContainers"] if native else spec["containers"]
        sidecar = where[0]
        assert sidecar["name"] == I.SIDECAR_NAME and (sidecar.get("restartPolicy") == "Always") == native
        tmp = [v for v in spec["volumes"] if v["name"] == I.VOLUME_NAME]
        own = [v for v in pod["spec"]["volumes"] if v["name"] == I.VOLUME_NAME]
        assert len(tmp) == 1 and (not own or tmp == own)  # a pod's own objfs-tmp (e.g. its sizeLimit) is kept
        annotations = pod["metadata"].get("annotations") or {}
        if "objfs.csi.dev/sidecar-memory-limit" in annotations:
            assert sidecar["resources"]["limits"]["memory"] == annotations["objfs.csi.dev/sidecar-memory-limit"]
