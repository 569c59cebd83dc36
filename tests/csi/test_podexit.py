"""When the node plugin tells a regular-container objfs sidecar to exit (csi.node.podexit), against the
mocked API server over TLS and a real emptyDir directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from csi.node.podexit import EXIT, IGNORE, WATCH, ExitWatcher, PodRef, verdict
from csi.webhook.inject import SIDECAR_NAME
from csi.webhook.kubeapi import KubeClient
from fusefs.wire.handoff import EXIT_FILE
from testing.kubemock import FakeApiServer

UID = "0f6c1c9e-1111-4c7e-9d2a-000000000001"


def pod(policy: str | None = "Never", states: dict[str, dict[str, Any]] | None = None, native: bool = False,
        uid: str = UID, containers: tuple[str, ...] = ("job",)) -> dict[str, Any]:
    sidecar = {"name": SIDECAR_NAME, "image": "objfs-csi"}
    spec: dict[str, Any] = {"containers": [{"name": c, "image": "busybox"} for c in containers]}
    if native:
        spec["initContainers"] = [{**sidecar, "restartPolicy": "Always"}]
    else:
        spec["containers"].insert(0, sidecar)
    if policy is not None:
        spec["restartPolicy"] = policy
    statuses = [{"name": SIDECAR_NAME, "state": {"running": {}}}]
    statuses += [{"name": c, "state": (states or {}).get(c, {"running": {}})} for c in containers]
    return {"metadata": {"name": "p", "namespace": "ml", "uid": uid}, "spec": spec,
            "status": {"containerStatuses": statuses}}


def done(code: int = 0) -> dict[str, Any]:
    return {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}}


@pytest.mark.parametrize(("p", "expected"), [
    (pod("Never"), WATCH),  # still running
    (pod("Never", {"job": done(0)}), EXIT),
    (pod("Never", {"job": done(1)}), EXIT),  # failed for good: the pod ends Failed, the sidecar must go too
    (pod("OnFailure", {"job": done(0)}), EXIT),
    (pod("OnFailure", {"job": done(2)}), WATCH),  # kubelet restarts it
    (pod("Never", {"a": done(0)}, containers=("a", "b")), WATCH),  # b still runs
    (pod("Never", {"a": done(0), "b": done(0)}, containers=("a", "b")), EXIT),
    (pod("Never", {"job": {"waiting": {"reason": "ContainerCreating"}}}), WATCH),
    (pod("Always", {"job": done(0)}), IGNORE),  # its containers are restarted: kubelet stops the sidecar at deletion
    (pod(None, {"job": done(0)}), IGNORE),  # Always is the default
    (pod("Never", {"job": done(0)}, native=True), IGNORE),  # a native sidecar is kubelet's to stop
    (pod("Never", {"job": done(0)}, uid="another"), IGNORE),  # a new pod of the same name
    (pod("Never", containers=()), IGNORE),
    ({"metadata": {"uid": UID}, "spec": {"restartPolicy": "Never", "containers": [{"name": "job"}]}}, IGNORE),
])
def test_verdict(p: dict[str, Any], expected: str) -> None:
    what, why = verdict(p, UID)
    assert what == expected, why
    assert why


@pytest.fixture
def api(tmp_path: Path) -> Any:
    with FakeApiServer(tmp_path / "api") as server:
        yield server


def watcher_for(api: FakeApiServer, empty_dirs: dict[str, Path], refs: list[PodRef],
                token_file: Path | None = None) -> ExitWatcher:
    kube = KubeClient(api.url, str(token_file or api.token_file), str(api.ca_file))
    return ExitWatcher(kube, lambda: list(refs), lambda uid: str(empty_dirs[uid]), interval=0.01)


def test_the_exit_file_is_written_once_the_job_is_done_and_the_pod_is_then_left_alone(
        api: FakeApiServer, tmp_path: Path) -> None:
    empty = tmp_path / "objfs-tmp"
    empty.mkdir()
    path = "/api/v1/namespaces/ml/pods/job-1"
    api.put(path, pod("Never"))
    w = watcher_for(api, {UID: empty}, [PodRef("ml", "job-1", UID)])
    w.check_once()
    w.check_once()
    assert api.count("GET", path) == 2 and not (empty / EXIT_FILE).exists()  # watched while it runs
    api.put(path, pod("Never", {"job": done(0)}))
    w.check_once()
    assert "every container but objfs-sidecar terminated" in (empty / EXIT_FILE).read_text()
    w.check_once()
    assert api.count("GET", path) == 3  # told once: not asked again


def test_native_deleted_and_unreadable_pods(api: FakeApiServer, tmp_path: Path) -> None:
    dirs = {u: tmp_path / u for u in ("native", "gone", "denied")}
    for d in dirs.values():
        d.mkdir()
    api.put("/api/v1/namespaces/ml/pods/native", pod("Never", {"job": done(0)}, native=True, uid="native"))
    refs = [PodRef("ml", "native", "native"), PodRef("ml", "gone", "gone")]
    w = watcher_for(api, dirs, refs)
    for _ in range(3):
        w.check_once()
    assert api.count("GET", "/pods/native") == 1 and api.count("GET", "/pods/gone") == 1  # one look each
    assert not any((d / EXIT_FILE).exists() for d in dirs.values())
    # An API error is no answer: the pod is asked again next time, never told to exit on a guess.
    wrong_token = tmp_path / "wrong-token"
    wrong_token.write_text("nope")
    api.put("/api/v1/namespaces/ml/pods/denied", pod("Never", {"job": done(0)}, uid="denied"))
    w = watcher_for(api, dirs, [PodRef("ml", "denied", "denied")], token_file=wrong_token)
    w.check_once()
    w.check_once()
    assert api.count("GET", "/pods/denied") == 2 and not (dirs["denied"] / EXIT_FILE).exists()


def test_pods_no_longer_served_are_forgotten(api: FakeApiServer, tmp_path: Path) -> None:
    empty = tmp_path / "d"
    empty.mkdir()
    refs = [PodRef("ml", "p", UID)]
    api.put("/api/v1/namespaces/ml/pods/p", pod("Always"))
    w = watcher_for(api, {UID: empty}, refs)
    w.check_once()
    w.check_once()
    assert api.count("GET", "/pods/") == 1  # restartPolicy Always: left alone
    refs.clear()  # unpublished: forgotten
    w.check_once()
    refs.append(PodRef("ml", "p", UID))  # published again: looked at again
    refs.append(PodRef("", "", "no-pod-info"))  # a record from before pod names were kept: skipped
    w.check_once()
    assert api.count("GET", "/pods/") == 2
