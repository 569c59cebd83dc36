"""The Helm chart (deploy/helm/objfs) renders the kustomize base (deploy/) with its default values, and
each value changes what it says: rendered by the real helm and kustomize (``make tools`` builds both)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from csi.main import parse_args
from fusefs.config import GiB

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "objfs"
Key = tuple[str, str, str, str]


def tool(name: str) -> str:
    found = shutil.which(name, path=str(ROOT / ".tools" / "bin") + os.pathsep + os.environ.get("PATH", ""))
    if not found:
        raise RuntimeError(f"{name} not found: run `make tools` (builds it into .tools/bin)")
    return found


def parse(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def kustomize() -> list[dict[str, Any]]:
    out = subprocess.run([tool("kustomize"), "build", str(ROOT / "deploy")], check=True, capture_output=True,
                         text=True)
    return parse(out.stdout)


def helm(*sets: str, namespace: str = "objfs", check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [tool("helm"), "template", "objfs", str(CHART), "--namespace", namespace]
    for s in sets:
        argv += ["--set", s]
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def render(*sets: str, namespace: str = "objfs") -> dict[Key, dict[str, Any]]:
    return keyed(parse(helm(*sets, namespace=namespace).stdout))


def keyed(objects: list[dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    out: dict[Key, dict[str, Any]] = {}
    for o in objects:
        meta = o["metadata"]
        key = (o["apiVersion"], o["kind"], meta.get("namespace", ""), meta["name"])
        assert key not in out, f"{key} rendered twice"
        out[key] = o
    return out


def one(objects: dict[Key, dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for (_, k, _, n), o in objects.items() if (k, n) == (kind, name)]
    return found


def container(objects: dict[Key, dict[str, Any]], kind: str, name: str, container_name: str) -> dict[str, Any]:
    pod = one(objects, kind, name)["spec"]["template"]["spec"]
    (found,) = [c for c in pod["containers"] if c["name"] == container_name]
    return found


def node_plugin(objects: dict[Key, dict[str, Any]]) -> dict[str, Any]:
    return container(objects, "DaemonSet", "objfs-csi-node", "objfs-csi")


def test_default_values_render_the_kustomize_base() -> None:
    base = keyed(kustomize())
    chart = render()
    # The release's namespace must exist before `helm install` (the release is kept there), so by
    # default the chart leaves it out; everything else is the same objects, field by field.
    namespaces = [k for k in base if k[1] == "Namespace"]
    assert namespaces == [("v1", "Namespace", "", "objfs")]
    assert sorted(set(base) - set(chart)) == namespaces and not set(chart) - set(base)
    for key, obj in chart.items():
        assert obj == base[key], key
    assert render("namespace.create=true") == base


def test_the_chart_renders_real_flags() -> None:
    """Every objfs container's args are accepted by objfs-csi's own parser, and the node plugin's
    carry the chart's defaults."""
    objects = render()
    args = parse_args(node_plugin(objects)["args"])
    assert (args.mode, args.cache_dir, args.cache_size, args.state_dir) == (
        "node", "/var/lib/objfs/cache", 10 * GiB, "/var/lib/objfs/state")
    assert args.metrics_address == ":9810"
    controller = container(objects, "Deployment", "objfs-csi-controller", "objfs-csi")
    assert parse_args(controller["args"]).mode == "controller"
    hook = parse_args(container(objects, "Deployment", "objfs-webhook", "objfs-webhook")["args"])
    assert (hook.mode, hook.native_sidecars) == ("webhook", "auto")


def test_metrics_disabled_removes_the_flag_and_the_port() -> None:
    plugin = node_plugin(render("metrics.enabled=false"))
    assert not [a for a in plugin["args"] if a.startswith("--metrics-address")]
    assert [p["name"] for p in plugin["ports"]] == ["healthz"]
    assert parse_args(plugin["args"]).metrics_address == ""  # the plugin's default: off


def test_metrics_port() -> None:
    plugin = node_plugin(render("metrics.port=9900"))
    assert parse_args(plugin["args"]).metrics_address == ":9900"
    assert {"name": "metrics", "containerPort": 9900} in plugin["ports"]


def test_node_cache_path_and_size() -> None:
    objects = render("node.cache.path=/mnt/nvme/objfs-cache", "node.cache.size=200G", "node.statePath=/srv/objfs")
    plugin = node_plugin(objects)
    args = parse_args(plugin["args"])
    assert (args.cache_dir, args.cache_size, args.state_dir) == ("/mnt/nvme/objfs-cache", 200 * GiB, "/srv/objfs")
    assert "--cache-size=200G" in plugin["args"]
    mounts = {m["name"]: m["mountPath"] for m in plugin["volumeMounts"]}
    assert (mounts["objfs-cache"], mounts["objfs-state"]) == ("/mnt/nvme/objfs-cache", "/srv/objfs")
    volumes = {v["name"]: v for v in one(objects, "DaemonSet", "objfs-csi-node")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["objfs-cache"]["hostPath"] == {"path": "/mnt/nvme/objfs-cache", "type": "DirectoryOrCreate"}
    assert volumes["objfs-state"]["hostPath"] == {"path": "/srv/objfs", "type": "DirectoryOrCreate"}


@pytest.mark.parametrize("launcher", ["process", "sidecar"])
def test_launcher(launcher: str) -> None:
    args = parse_args(node_plugin(render(f"node.launcher={launcher}"))["args"])
    assert (args.launcher, args.allow_process_fallback) == (launcher, False)
    fallback = parse_args(node_plugin(render("node.launcher=sidecar", "node.allowProcessFallback=true"))["args"])
    assert (fallback.launcher, fallback.allow_process_fallback) == ("sidecar", True)


def test_webhook_disabled_removes_all_of_it() -> None:
    full, without = render("node.launcher=process"), render("node.launcher=process", "webhook.enabled=false")
    gone = {k for k in set(full) - set(without)}
    assert {(k[1], k[3]) for k in gone} == {
        ("ServiceAccount", "objfs-webhook"), ("ClusterRole", "objfs-webhook"),
        ("ClusterRoleBinding", "objfs-webhook"), ("Role", "objfs-webhook"), ("RoleBinding", "objfs-webhook"),
        ("Secret", "objfs-webhook-tls"), ("Deployment", "objfs-webhook"), ("Service", "objfs-webhook"),
        ("MutatingWebhookConfiguration", "objfs-webhook")}
    assert set(without) < set(full)


def test_sidecar_launcher_without_the_webhook_is_refused_with_what_to_do() -> None:
    done = helm("node.launcher=sidecar", "webhook.enabled=false", check=False)
    assert done.returncode != 0
    assert "node.launcher=sidecar needs the webhook" in done.stderr and "webhook.enabled=true" in done.stderr
    # the plugin's own fallback makes it a working combination
    render("node.launcher=sidecar", "webhook.enabled=false", "node.allowProcessFallback=true")


def test_values_the_schema_refuses() -> None:
    for bad, field in (("node.launcher=pod", "launcher"), ("node.cache.size=lots", "size"),
                       ("image.pullPolicy=Sometimes", "pullPolicy"), ("metrics.port=0", "port"),
                       ("node.cache.path=relative/dir", "path"), ("webhook.nativeSidecars=yes", "nativeSidecars")):
        done = helm(bad, check=False)
        assert done.returncode != 0 and field in done.stderr, (bad, done.stderr)


def test_image_on_every_objfs_container_and_only_there() -> None:
    objects = render("image.repository=registry.example/objfs", "image.tag=1.2.3", "image.pullPolicy=Always",
                     "imagePullSecrets[0].name=regcred")
    objfs = [("DaemonSet", "objfs-csi-node", "objfs-csi"), ("Deployment", "objfs-csi-controller", "objfs-csi"),
             ("Deployment", "objfs-webhook", "objfs-webhook")]
    for kind, name, c in objfs:
        found = container(objects, kind, name, c)
        assert (found["image"], found["imagePullPolicy"]) == ("registry.example/objfs:1.2.3", "Always")
        assert one(objects, kind, name)["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    for _, kind, _, name in [k for k in objects if k[1] in ("DaemonSet", "Deployment")]:
        for c in one(objects, kind, name)["spec"]["template"]["spec"]["containers"]:
            if (kind, name, c["name"]) not in objfs:
                assert c["image"].startswith("registry.k8s.io/sig-storage/") and "imagePullPolicy" not in c
    # the tag defaults to the chart's appVersion
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert node_plugin(render())["image"] == f"ghcr.io/objfs/objfs-csi:{chart['appVersion']}"


def test_node_scheduling_and_resources() -> None:
    objects = render("node.nodeSelector.objfs\\.csi\\.dev/disk=nvme", "node.tolerations[0].key=gpu",
                     "node.tolerations[0].operator=Exists", "node.resources.limits.memory=2Gi",
                     "node.resources.requests.cpu=250m")
    pod = one(objects, "DaemonSet", "objfs-csi-node")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"objfs.csi.dev/disk": "nvme"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    default = yaml.safe_load((CHART / "values.yaml").read_text())["node"]["resources"]
    assert node_plugin(objects)["resources"] == {"requests": {**default["requests"], "cpu": "250m"},
                                                 "limits": {**default["limits"], "memory": "2Gi"}}
    # the other components keep theirs
    controller = one(objects, "Deployment", "objfs-csi-controller")["spec"]["template"]["spec"]
    assert "nodeSelector" not in controller and "tolerations" not in controller


def test_another_namespace_everywhere() -> None:
    objects = render(namespace="storage")
    for (_, kind, ns, name), obj in objects.items():
        cluster_wide = kind in ("CSIDriver", "ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration")
        assert ns == ("" if cluster_wide else "storage"), (kind, name)
        for subject in obj.get("subjects", []):
            assert subject["namespace"] == "storage"
    (hook,) = one(objects, "MutatingWebhookConfiguration", "objfs-webhook")["webhooks"]
    assert hook["clientConfig"]["service"]["namespace"] == "storage"
    (expr,) = hook["namespaceSelector"]["matchExpressions"]
    assert expr["values"] == ["storage", "kube-system"]  # the webhook never handles its own namespace's pods


def test_node_extra_args_reach_the_plugin() -> None:
    plugin = node_plugin(render("node.extraArgs[0]=--inline-buckets=models-*", "node.extraArgs[1]=--stats-timeout=5"))
    args = parse_args(plugin["args"])
    assert (args.inline_buckets, args.stats_timeout) == ("models-*", 5.0)
    assert helm("node.extraArgs[0]=inline-buckets", check=False).returncode != 0  # the schema wants flags


def test_snapshots_off_and_resizer_on() -> None:
    full = render()
    without = render("snapshots.enabled=false")
    assert {k[3] for k in set(full) - set(without)} == {"objfs-csi-snapshotter"}  # its role and binding

    def sidecars(objects: dict[Key, dict[str, Any]]) -> set[str]:
        dep = objects["apps/v1", "Deployment", "objfs", "objfs-csi-controller"]
        return {c["name"] for c in dep["spec"]["template"]["spec"]["containers"]}

    assert "csi-snapshotter" in sidecars(full) and "csi-snapshotter" not in sidecars(without)
    resizing = render("controller.resizer=true")
    assert "csi-resizer" in sidecars(resizing) and "csi-resizer" not in sidecars(full)
    assert {k[3] for k in set(resizing) - set(full)} == {"objfs-csi-resizer"}
