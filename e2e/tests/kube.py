"""A thin kubectl wrapper for the e2e tests: they drive the real cluster that e2e/run.sh started, as a
user would, through kubectl (no client library: what the tests do is what a person could type)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import yaml

Obj = dict[str, Any]

#: the objfs image (it has Python and a shell), for the test workloads too: no registry here
IMAGE = "localhost/objfs-csi:e2e"
NAMESPACE = "e2e"
DRIVER = "objfs.csi.dev"
#: the cluster's nodes (e2e/inside.sh: E2E_NODES); the tests run in the first one's network and mount
#: namespaces, so they can look at its mounts and the node plugin's state, and at no other node's
NODES = os.environ.get("E2E_NODES", "objfs-e2e").split()
FIRST_NODE = NODES[0]


class Kube:
    def __init__(self, kubeconfig: str) -> None:
        self.env = dict(os.environ, KUBECONFIG=kubeconfig)

    def run(self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 300) -> str:
        proc = subprocess.run(["kubectl", *args], input=stdin, capture_output=True, text=True,
                              env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def apply(self, *objs: Mapping[str, Any]) -> None:
        self.run("apply", "-f", "-", stdin=yaml.safe_dump_all(list(objs)))

    def delete(self, kind: str, name: str, namespace: str = NAMESPACE, wait: bool = True) -> None:
        self.run("-n", namespace, "delete", kind, name, "--ignore-not-found", f"--wait={str(wait).lower()}",
                 timeout=600)

    def get(self, kind: str, name: str = "", namespace: str | None = NAMESPACE, selector: str = "") -> Obj:
        args = ["get", kind] + ([name] if name else []) + ["-o", "json"]
        if namespace:
            args[:0] = ["-n", namespace]
        if selector:
            args += ["-l", selector]
        out: Obj = json.loads(self.run(*args))
        return out

    def exists(self, kind: str, name: str, namespace: str | None = NAMESPACE) -> bool:
        args = ["get", kind, name, "--ignore-not-found", "-o", "name"]
        if namespace:
            args[:0] = ["-n", namespace]
        return bool(self.run(*args).strip())

    def wait_for(self, what: str, ready: Callable[[], Any], timeout: float = 600, every: float = 2) -> Any:
        """Polls ``ready`` until it returns something truthy. A generous bound on a noisy machine:
        it only stops a test that would otherwise hang; it asserts nothing about speed."""
        deadline = time.monotonic() + timeout
        while True:
            got = ready()
            if got:
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not after {timeout:.0f} s\n{self.events()}")
            time.sleep(every)

    def events(self, namespace: str = NAMESPACE) -> str:
        return self.run("-n", namespace, "get", "events", "--sort-by=.lastTimestamp", check=False)[-4000:]

    def pod_phase(self, name: str) -> str:
        if not self.exists("pod", name):
            return ""
        return str(self.get("pod", name).get("status", {}).get("phase", ""))

    def wait_pod_done(self, name: str, timeout: float = 600) -> Obj:
        phase = self.wait_for(f"pod {name} finished",
                              lambda: (p := self.pod_phase(name)) in ("Succeeded", "Failed") and p, timeout)
        pod = self.get("pod", name)
        if phase != "Succeeded":
            raise AssertionError(f"pod {name} {phase}: {self.logs(name)}\n{json.dumps(pod['status'])[:3000]}")
        return pod

    def logs(self, pod: str, container: str = "") -> str:
        args = ["-n", NAMESPACE, "logs", pod] + (["-c", container] if container else [])
        return self.run(*args, check=False)

    def exec(self, pod: str, *cmd: str, container: str = "", check: bool = True) -> str:
        args = ["-n", NAMESPACE, "exec", pod] + (["-c", container] if container else []) + ["--", *cmd]
        return self.run(*args, check=check, timeout=120)


def pod(name: str, script: str, volumes: Iterable[Obj], mounts: Iterable[Obj],
        restart: str = "Never", labels: Mapping[str, str] | None = None, node: str | None = FIRST_NODE) -> Obj:
    """A pod on the pod network running ``script`` in Python, on ``node`` (None: where the scheduler
    puts it)."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": dict(labels or {})},
            "spec": pod_spec(script, volumes, mounts, restart, node=node)}


def pod_spec(script: str, volumes: Iterable[Obj], mounts: Iterable[Obj], restart: str = "Never",
             readiness: str | None = None, node: str | None = FIRST_NODE) -> Obj:
    container: Obj = {"name": "app", "image": IMAGE, "imagePullPolicy": "Never",
                      "command": ["python3", "-c", script], "volumeMounts": list(mounts)}
    if readiness:
        container["readinessProbe"] = {"exec": {"command": ["test", "-e", readiness]}, "periodSeconds": 2}
    spec: Obj = {"restartPolicy": restart, "terminationGracePeriodSeconds": 10,
                 "containers": [container], "volumes": list(volumes)}
    if node:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    return spec
