"""Pods and a kubelet, played by processes and directories, for the sidecar launcher's tests.

- ``objfs_command_for_nobody``: an ``objfs`` command uid 65534 can run (the venv's interpreter may
  live under a private /root: the system python3 of the same minor version, with our paths).
- ``FakeKubelet``: a kubelet root in a temp dir; a pod is ``pods/<uid>/`` with the ``objfs-tmp``
  emptyDir when it has a sidecar; ``publish`` creates the target's parent and passes pod info,
  as kubelet does.
- ``SidecarPod``: the pod's ``objfs sidecar``, in a mount and PID namespace of its own (unshare),
  as uid 65534 with no capabilities and a read-only root, the node plugin's directories hidden
  (a pod sees none of the node's paths). Killing it kills the namespace, as a container kill does.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from csi.v1 import csi_pb2 as pb
from testing.plugin import Client, children

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
Mode = pb.VolumeCapability.AccessMode
SETPRIV_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--no-new-privs",
                  "--"]


def objfs_command_for_nobody(path: Path) -> str | None:
    """Write a launcher for ``objfs`` at ``path`` that uid 65534 can run; None where that is impossible."""
    return script_for_nobody(path, "from fusefs.proc.cli import main\nsys.exit(main())\n")


def script_for_nobody(path: Path, body: str) -> str | None:
    """Write ``body`` as a Python script at ``path`` that uid 65534 can run with this repository and
    the venv's packages (and pyfuse3's libfuse) importable; None where that is impossible."""
    site = sysconfig.get_paths()["purelib"]
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return None
    version = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.strip()
    if version != str(sys.version_info[:2]):
        return None
    preload = _readable_native_libs(path.parent / "objfs-native-lib")
    preamble = (f"#!{SYSTEM_PYTHON}\nimport ctypes, sys\nsys.path[:0] = [{str(REPO)!r}, {site!r}]\n"
                f"for lib in {preload!r}:\n    ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)\n")
    path.write_text(preamble + body)
    path.chmod(0o755)
    check = path.with_name(path.name + "-probe")  # what it needs: our packages, pyfuse3 and its libfuse
    check.write_text(preamble + "import fusefs.proc.cli, pyfuse3\n")
    check.chmod(0o755)
    imports = subprocess.run([str(check)], user=65534, group=65534, extra_groups=[], capture_output=True)
    return str(path) if imports.returncode == 0 else None


def _readable_native_libs(into: Path) -> list[str]:
    """The patched pyfuse3 (make native) finds its libfuse by a runpath under root's home, which
    uid 65534 cannot enter: copy the libraries it needs from there to ``into`` (readable), for the
    launcher to load before pyfuse3 (the loader then finds them by soname)."""
    import pyfuse3

    found = subprocess.run(["ldd", pyfuse3.__file__ or ""], capture_output=True, text=True).stdout
    libs = []
    for line in found.splitlines():
        parts = line.split("=>")
        lib = parts[1].split("(")[0].strip() if len(parts) == 2 else ""
        if lib.startswith(str(Path.home()) + "/"):
            into.mkdir(mode=0o755, exist_ok=True)
            libs.append(str(Path(shutil.copy2(lib, into / Path(lib).name))))
    return libs


def cap(mode: int = Mode.SINGLE_NODE_WRITER, block: bool = False, group: str = "") -> pb.VolumeCapability:
    """A volume capability as kubelet sends it: a mount (or ``block``) with one access mode (any
    int: the tests also send values the spec does not define)."""
    access = Mode(mode=cast("pb.VolumeCapability.AccessMode.Mode", mode))
    if block:
        return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(), access_mode=access)
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(volume_mount_group=group), access_mode=access)


def wait_for(predicate: object, timeout: float = 60.0, what: str = "condition") -> None:
    """Poll ``predicate()`` until true; a generous deadline only against hangs (nothing is timed)."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(0.05)


def kubelet_context(uid: str) -> dict[str, str]:
    """The keys besides the volume's own attributes that a real cluster puts into NodePublish's
    volume_context (checked on the e2e cluster): kubelet's pod info (``podInfoOnMount``) and the
    mark external-provisioner leaves in every PV it makes."""
    return {"csi.storage.k8s.io/pod.name": f"pod-{uid[:5]}", "csi.storage.k8s.io/pod.namespace": "ml",
            "csi.storage.k8s.io/pod.uid": uid, "csi.storage.k8s.io/serviceAccount.name": "default",
            "csi.storage.k8s.io/ephemeral": "false",
            "storage.kubernetes.io/csiProvisionerIdentity": "1764745432123-8081-objfs.csi.dev"}


@dataclass
class FakeKubelet:
    root: Path

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)

    def pod_dir(self, uid: str) -> Path:
        return self.root / "pods" / uid

    def empty_dir(self, uid: str) -> Path:
        return self.pod_dir(uid) / "volumes" / "kubernetes.io~empty-dir" / "objfs-tmp"

    def new_pod(self, sidecar: bool = True) -> str:
        uid = str(uuid.uuid4())
        self.pod_dir(uid).mkdir(parents=True)
        for p in (self.root / "pods", self.pod_dir(uid)):
            os.chmod(p, 0o755)
        if sidecar:
            d = self.empty_dir(uid)
            d.mkdir(parents=True)
            os.chmod(d, 0o777)  # what kubelet makes of an emptyDir
            for p in (d.parent, d.parent.parent):
                os.chmod(p, 0o755)
        return uid

    def publish(self, client: Client, uid: str, pv: str, volume_id: str, context: dict[str, str],
                secrets: dict[str, str], readonly: bool = False, mode: int = Mode.SINGLE_NODE_WRITER,
                timeout: float = 120) -> str:
        parent = self.pod_dir(uid) / "volumes" / "kubernetes.io~csi" / pv
        parent.mkdir(parents=True, exist_ok=True)
        target = str(parent / "mount")
        client.node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=volume_id, target_path=target, volume_capability=cap(mode), readonly=readonly,
            volume_context={**context, **kubelet_context(uid)}, secrets=secrets), timeout=timeout)
        return target

    @staticmethod
    def unpublish(client: Client, volume_id: str, target: str) -> None:
        client.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target),
                                        timeout=120)


@dataclass
class SidecarPod:
    """``objfs sidecar --dir <emptyDir>`` in its own mount + PID namespace, as uid 65534."""

    directory: Path
    command: str  # from objfs_command_for_nobody
    hide: list[Path] = field(default_factory=list)  # node paths the pod must not see
    log_path: Path | None = None
    as_root: bool = False  # the tenant's own image may run its "sidecar" as root
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SidecarPod:
        d = shlex.quote(str(self.directory))
        script = ["set -e"]
        script += [f"mount -t tmpfs -o size=1m,mode=0700 objfs-hidden {shlex.quote(str(h))}" for h in self.hide]
        # The emptyDir stays writable; everything else of the root file system becomes read-only.
        script += [f"mount --bind {d} {d}", "mount -o remount,bind,ro /"]
        drop = [] if self.as_root else SETPRIV_NOBODY
        script.append("exec " + shlex.join([*drop, self.command, "sidecar", "--dir", str(self.directory)]))
        log_path = self.log_path or self.directory.parent / f"sidecar-{os.getpid()}-{id(self)}.log"
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc",
                 "sh", "-c", "\n".join(script)],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        proc = self.proc
        wait_for(lambda: (self.directory / "objfs.sock").exists() or proc.poll() is not None,
                 what="the sidecar's socket")
        if self.proc.poll() is not None:
            raise RuntimeError(f"the sidecar pod exited: {log_path.read_text()[-2000:]}")
        return self

    @property
    def init_pid(self) -> int | None:
        """The sidecar itself: pid 1 of the pod's PID namespace (as seen from here)."""
        if self.proc is None:
            return None
        kids = children(self.proc.pid)
        return kids[0] if kids else None

    def server_pids(self) -> list[int]:
        init = self.init_pid
        return children(init) if init is not None else []

    def kill(self) -> None:
        """SIGKILL the namespace's init: every process of the pod dies with it."""
        init = self.init_pid
        if init is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(init, signal.SIGKILL)
        self.wait()

    def terminate(self) -> None:
        """What kubelet does to stop the container: SIGTERM to its first process."""
        init = self.init_pid
        if init is not None:
            os.kill(init, signal.SIGTERM)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


def processes_holding(root: str) -> list[int]:
    """Pids of processes (other than this one) with an open file below ``root``."""
    prefix = os.path.normpath(root) + "/"
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{name}/fd/{fd}")
            except OSError:
                continue
            if link.startswith(prefix):
                found.append(int(name))
                break
    return found
