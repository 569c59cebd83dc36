"""Telling a pod's objfs sidecar to exit once the pod's own containers are done.

A native sidecar (Kubernetes >= 1.29: an init container with ``restartPolicy: Always``) needs
none of this: kubelet stops it after the pod's containers. Before 1.29 the webhook injects it as
a regular container, and a regular container that never exits keeps a Job's pod Running
forever. So the node plugin looks, every ``interval`` seconds, at the pods it hands volumes to
whose sidecar is a regular container, and once their other containers have terminated for good
writes the file ``exit`` into the pod's ``objfs-tmp`` emptyDir; the sidecar (``fusefs.proc.sidecar``)
watches for it, lets its servers finish their uploads and unmount their end, and exits 0.

Why the plugin and not the sidecar itself: a container cannot see its siblings' states without
the API, and the sidecar runs with the pod's service account, which would then need to read pods
in every namespace that uses objfs. The plugin already runs on every node with its own account,
knows which pods it serves (its records, so a restarted plugin picks the watch up again), and
can write into their emptyDirs. If it is down, the exit is only late, never wrong: it writes the
file only on a pod it has just read, whose containers will not run again.

What it costs the API server: one GET per such pod at most every ``interval`` seconds, and one
GET for the others (native sidecar, ``restartPolicy: Always``), after which they are left alone.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from csi.webhook.inject import SIDECAR_NAME
from csi.webhook.kubeapi import ApiError, KubeClient
from fusefs.wire import handoff

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PodRef:
    namespace: str
    name: str
    uid: str


# What a look at a pod found: go on watching it, leave it alone for good, or tell its sidecar to exit.
WATCH, IGNORE, EXIT = "watch", "ignore", "exit"


def verdict(pod: Mapping[str, Any], uid: str) -> tuple[str, str]:
    """(WATCH | IGNORE | EXIT, why) for a pod as the API server returned it."""
    if (pod.get("metadata") or {}).get("uid") != uid:
        return IGNORE, "another pod of that name (ours is gone)"
    spec = pod.get("spec") or {}
    if any(c.get("name") == SIDECAR_NAME for c in spec.get("initContainers") or []):
        return IGNORE, "native sidecar: kubelet stops it"
    containers = [c.get("name") for c in spec.get("containers") or []]
    if SIDECAR_NAME not in containers:
        return IGNORE, "no objfs-sidecar container"
    policy = spec.get("restartPolicy") or "Always"
    if policy == "Always":
        return IGNORE, "restartPolicy Always: its containers never finish for good"
    states = {s.get("name"): s.get("state") or {} for s in (pod.get("status") or {}).get("containerStatuses") or []}
    main = [name for name in containers if name != SIDECAR_NAME]
    if not main:
        return IGNORE, "no container but objfs-sidecar"
    ended = {name: states.get(name, {}).get("terminated") for name in main}
    running = [name for name, t in ended.items() if t is None]
    if running:
        return WATCH, f"container(s) {', '.join(running)} not terminated"
    if policy == "OnFailure":
        failed = [name for name, t in ended.items() if (t or {}).get("exitCode", 0) != 0]
        if failed:
            return WATCH, f"container(s) {', '.join(failed)} failed and will be restarted (restartPolicy OnFailure)"
    return EXIT, f"every container but {SIDECAR_NAME} terminated (restartPolicy {policy})"


def write_exit_file(directory: str, why: str) -> bool:
    """Create ``directory/exit`` (the sidecar only looks whether it exists); False if the dir is gone."""
    path = os.path.join(directory, handoff.EXIT_FILE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        return True
    except OSError:
        return False
    try:
        os.write(fd, f"objfs-csi node plugin: {why}\n".encode())
    finally:
        os.close(fd)
    return True


class ExitWatcher:
    """Every ``interval`` s, looks at the pods ``pods()`` names and writes their exit file when due."""

    def __init__(self, kube: KubeClient, pods: Callable[[], Iterable[PodRef]], pod_dir: Callable[[str], str],
                 interval: float = 10.0) -> None:
        self.kube = kube
        self.pods = pods
        self.pod_dir = pod_dir
        self.interval = interval
        self._settled: set[str] = set()  # uids told to exit, or to be left alone
        self._complained: dict[str, str] = {}  # uid -> the last API error logged for it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="sidecar-exit-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check_once()
            except Exception:  # never let one bad answer end the watch
                log.exception("checking pods for finished containers failed")

    def check_once(self) -> None:
        current = {p.uid: p for p in self.pods() if p.uid and p.namespace and p.name}
        self._settled &= set(current)  # forget pods no longer served here
        for uid in list(self._complained):
            if uid not in current:
                del self._complained[uid]
        for uid, ref in current.items():
            if uid not in self._settled:
                self._check(ref)

    def _check(self, ref: PodRef) -> None:
        try:
            pod = self.kube.pod(ref.namespace, ref.name)
        except ApiError as exc:
            if exc.status == 404:
                self._settled.add(ref.uid)  # deleted: kubelet stops its containers itself
                return
            if self._complained.get(ref.uid) != str(exc):
                log.warning("pod %s/%s: cannot read it to tell whether its containers are done (%s); "
                            "retrying every %.0f s", ref.namespace, ref.name, exc, self.interval)
                self._complained[ref.uid] = str(exc)
            return
        self._complained.pop(ref.uid, None)
        what, why = verdict(pod, ref.uid)
        if what == IGNORE:
            log.debug("pod %s/%s: not watched (%s)", ref.namespace, ref.name, why)
            self._settled.add(ref.uid)
        elif what == EXIT:
            if write_exit_file(self.pod_dir(ref.uid), why):
                log.info("pod %s/%s: %s; told its objfs-sidecar to finish its uploads and exit", ref.namespace,
                         ref.name, why)
            self._settled.add(ref.uid)


def start_watcher(args: Any, pods: Callable[[], Iterable[PodRef]], pod_dir: Callable[[str], str]
                  ) -> ExitWatcher | None:
    """The watcher the flags ask for, started; None (with a warning) when there is no API to ask."""
    if args.sidecar_exit_poll <= 0:
        return None
    try:
        kube = KubeClient.in_cluster(args.kube_api, args.kube_token_file, args.kube_ca_file)
    except ApiError as exc:
        log.warning("no Kubernetes API (%s): objfs sidecars that are regular containers (Kubernetes < 1.29) "
                    "will not be told when their pod's containers are done", exc)
        return None
    watcher = ExitWatcher(kube, pods, pod_dir, args.sidecar_exit_poll)
    watcher.start()
    return watcher
