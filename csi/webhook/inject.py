"""What the admission webhook does to a pod: decide whether it gets the objfs sidecar, and the
JSONPatch (RFC 6902) that adds it.

Pure functions of the pod (a dict as the API server sends it) and a few settings, so every case is
testable without a cluster. The sidecar's shape is a contract with the node plugin (``csi.node.launcher``,
``csi.node.podexit``): container ``objfs-sidecar``,
the per-pod emptyDir ``objfs-tmp`` at ``/objfs-tmp`` (the node plugin hands the FUSE fd over a socket
in it), unprivileged and read-only, resources from the pod's annotations.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

ANNOTATION_PREFIX = "objfs.csi.dev/"
INJECT_ANNOTATION = "objfs.csi.dev/inject"
SIDECAR_NAME = "objfs-sidecar"
VOLUME_NAME = "objfs-tmp"
MOUNT_PATH = "/objfs-tmp"
DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"
SIDECAR_UID = 65534

# annotation -> (requests|limits, cpu|memory)
RESOURCE_ANNOTATIONS: dict[str, tuple[str, str]] = {
    "objfs.csi.dev/sidecar-cpu-request": ("requests", "cpu"),
    "objfs.csi.dev/sidecar-memory-request": ("requests", "memory"),
    "objfs.csi.dev/sidecar-cpu-limit": ("limits", "cpu"),
    "objfs.csi.dev/sidecar-memory-limit": ("limits", "memory"),
}
DEFAULT_RESOURCES: dict[str, dict[str, str]] = {
    "requests": {"cpu": "100m", "memory": "128Mi"},
    "limits": {"memory": "512Mi"},
}

Pod = dict[str, Any]
Patch = list[dict[str, Any]]
# (namespace, claim name) -> is it an objfs volume? None when it cannot be told (no API, lookup failed).
ClaimCheck = Callable[[str, str], bool | None]
# storage class name -> is its provisioner objfs? (generic ephemeral volumes)
ClassCheck = Callable[[str], bool | None]


class Refused(ValueError):
    """A pod the webhook denies, with this message."""


class InvalidAnnotation(Refused):
    """A pod's objfs annotation has a value that cannot be used: the pod is denied with this message."""


class ForeignSidecar(Refused):
    """A pod brings its own container named like the sidecar, other than the one the webhook injects."""


@dataclass(frozen=True)
class SidecarSettings:
    image: str
    native: bool  # an init container with restartPolicy Always (Kubernetes >= 1.29), else a regular container
    image_pull_policy: str = ""
    driver_name: str = "objfs.csi.dev"


@dataclass
class Decision:
    inject: bool
    reason: str
    warnings: list[str] = field(default_factory=list)


# -- quantities ------------------------------------------------------------------------------
_QUANTITY = re.compile(
    r"^(?P<num>[0-9]+(\.[0-9]*)?|\.[0-9]+)(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][-+]?[0-9]+)?$"
)
_SUFFIX: dict[str, Decimal] = {
    "": Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": Decimal("1e3"),
    "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"), "P": Decimal("1e15"), "E": Decimal("1e18"),
    **{s: Decimal(1024) ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
}


def parse_quantity(text: str) -> Decimal:
    """A Kubernetes resource quantity ("100m", "512Mi", "1.5", "2e3") as a number; ValueError if it is not one
    (negative values are refused too: a request or limit cannot be negative)."""
    m = _QUANTITY.match(text)
    if not m:
        raise ValueError(text)
    suffix = m.group("suffix") or ""
    try:
        scale = Decimal(10) ** int(suffix[1:]) if suffix[:1] in ("e", "E") else _SUFFIX[suffix]
        return Decimal(m.group("num")) * scale
    except (InvalidOperation, OverflowError, ValueError):
        raise ValueError(text) from None


def sidecar_resources(annotations: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """The sidecar's resources: the defaults, overridden by the pod's annotations. An empty annotation
    value removes that request or limit. A default request above a limit the pod set is lowered to the
    limit (Kubernetes refuses request > limit); an annotated request above an annotated limit is refused."""
    res = {kind: dict(values) for kind, values in DEFAULT_RESOURCES.items()}
    given: set[tuple[str, str]] = set()
    for key, (kind, resource) in RESOURCE_ANNOTATIONS.items():
        if key not in annotations:
            continue
        value = annotations[key].strip()
        given.add((kind, resource))
        if not value:
            res[kind].pop(resource, None)
            continue
        try:
            amount = parse_quantity(value)
        except ValueError:
            example = "100m or 0.5" if resource == "cpu" else "256Mi or 1Gi"
            raise InvalidAnnotation(
                f"annotation {key}: {annotations[key]!r} is not a Kubernetes quantity (e.g. {example})"
            ) from None
        if amount == 0 and kind == "limits":
            raise InvalidAnnotation(f"annotation {key}: a limit of 0 is not allowed; use \"\" for no limit")
        res[kind][resource] = value
    for resource in ("cpu", "memory"):
        request, limit = res["requests"].get(resource), res["limits"].get(resource)
        if request is None or limit is None or parse_quantity(request) <= parse_quantity(limit):
            continue
        if ("requests", resource) in given:
            req_key = f"{ANNOTATION_PREFIX}sidecar-{resource}-request"
            lim_key = f"{ANNOTATION_PREFIX}sidecar-{resource}-limit"
            raise InvalidAnnotation(f"annotation {req_key} ({request}) is above the {resource} limit ({limit}, "
                                    f"from {lim_key} or the default): lower the request or raise the limit")
        res["requests"][resource] = limit
    return {kind: values for kind, values in res.items() if values}


# -- the decision ----------------------------------------------------------------------------
def _inject_annotation(annotations: Mapping[str, str]) -> bool | None:
    value = annotations.get(INJECT_ANNOTATION)
    if value is None:
        return None
    if value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise InvalidAnnotation(f'annotation {INJECT_ANNOTATION}: {value!r} must be "true" or "false"')


def check_annotations(annotations: Mapping[str, str]) -> None:
    """Refuse a misspelt sidecar annotation by name (it would otherwise be ignored silently)."""
    known = set(RESOURCE_ANNOTATIONS)
    for key in annotations:
        if key.startswith(f"{ANNOTATION_PREFIX}sidecar-") and key not in known:
            raise InvalidAnnotation(f"unknown annotation {key}: known are {', '.join(sorted(known))}")


def _all_containers(spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]


# What makes the sidecar the sidecar: a container of this name differing in any of these from what the
# webhook injects is not ours. (Resources are left out: LimitRanges and other admission may change them.)
SIDECAR_IDENTITY = ("image", "command", "args", "securityContext", "restartPolicy")
# Values the API server fills into a container's securityContext by itself (defaulting), which the
# pod may hold on a re-invocation although the webhook did not write them.
_DEFAULTED_SECURITY = {"procMount": "Default"}


def _differences(container: Mapping[str, Any], ours: Mapping[str, Any]) -> list[str]:
    differ = []
    for key in SIDECAR_IDENTITY:
        have, want = container.get(key), ours.get(key)
        if key == "securityContext" and isinstance(have, dict):
            have = {k: v for k, v in have.items() if _DEFAULTED_SECURITY.get(k, object()) != v}
        if (have or None) != (want or None):  # absent, null and empty are the same to the API server
            differ.append(key)
    return differ


def already_injected(pod: Pod, settings: SidecarSettings) -> bool:
    """Whether the pod holds the sidecar the webhook injects (a re-invocation, or a pod re-created from
    an injected one). ForeignSidecar if it holds a container of that name that is not ours: the node
    plugin hands the pod's volumes to what listens in objfs-tmp, and a tenant's own "objfs-sidecar"
    must not be taken for the webhook's (it would pass for one wherever a name is all that is checked)."""
    found = [c for c in _all_containers(pod.get("spec") or {}) if c.get("name") == SIDECAR_NAME]
    if not found:
        return False
    ours = sidecar_container(settings, {})  # resources are not compared
    for container in found:
        differ = _differences(container, ours)
        if differ:
            raise ForeignSidecar(
                f"the pod has its own container named {SIDECAR_NAME!r}, which differs from the sidecar objfs "
                f"injects in {', '.join(differ)}: the name is reserved for objfs; rename that container")
    return True


def objfs_volumes(pod: Pod, namespace: str, driver: str, claim_is_objfs: ClaimCheck | None,
                  class_is_objfs: ClassCheck | None) -> tuple[list[str], list[str]]:
    """The names of the pod's volumes served by objfs, and warnings for volumes that could not be told."""
    found, unknown = [], []
    for vol in (pod.get("spec") or {}).get("volumes") or []:
        name = vol.get("name", "?")
        if (vol.get("csi") or {}).get("driver") == driver:
            found.append(name)
            continue
        answer: bool | None = False
        claim = (vol.get("persistentVolumeClaim") or {}).get("claimName")
        template = ((vol.get("ephemeral") or {}).get("volumeClaimTemplate") or {}).get("spec") or {}
        if claim and claim_is_objfs is not None:
            answer = claim_is_objfs(namespace, claim)
        elif template.get("storageClassName") and class_is_objfs is not None:
            answer = class_is_objfs(template["storageClassName"])
        if answer:
            found.append(name)
        elif answer is None:
            unknown.append(name)
    warnings = [f"objfs webhook: could not tell whether volume(s) {', '.join(unknown)} are objfs volumes; "
                f'annotate the pod {INJECT_ANNOTATION}: "true" if they are'] if unknown else []
    return found, warnings


def decide(pod: Pod, namespace: str, settings: SidecarSettings, claim_is_objfs: ClaimCheck | None = None,
           class_is_objfs: ClassCheck | None = None) -> Decision:
    """Whether this pod gets the sidecar. Raises InvalidAnnotation for objfs annotations with bad values,
    ForeignSidecar for a container named like the sidecar that is not the webhook's."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    check_annotations(annotations)
    wanted = _inject_annotation(annotations)
    if already_injected(pod, settings):
        return Decision(False, "already injected")
    if wanted is False:
        return Decision(False, f"{INJECT_ANNOTATION} is \"false\"")
    spec = pod.get("spec") or {}
    tmp = next((v for v in spec.get("volumes") or [] if v.get("name") == VOLUME_NAME), None)
    if tmp is not None and "emptyDir" not in tmp:
        msg = (f"objfs webhook: volume {VOLUME_NAME} is not an emptyDir; the objfs sidecar was not added "
               "(rename that volume: the name is reserved for objfs)")
        return Decision(False, "objfs-tmp is not an emptyDir", [msg])
    if wanted:
        return Decision(True, f"{INJECT_ANNOTATION} is \"true\"")
    found, warnings = objfs_volumes(pod, namespace, settings.driver_name, claim_is_objfs, class_is_objfs)
    if found:
        return Decision(True, f"objfs volume(s) {', '.join(found)}", warnings)
    return Decision(False, "no objfs volume", warnings)


# -- the patch -------------------------------------------------------------------------------
def sidecar_container(settings: SidecarSettings, resources: dict[str, dict[str, str]]) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": SIDECAR_NAME,
        "image": settings.image,
        "command": ["objfs", "sidecar", "--dir", MOUNT_PATH],
        "resources": resources,
        "securityContext": {
            "runAsUser": SIDECAR_UID, "runAsGroup": SIDECAR_UID, "runAsNonRoot": True,
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            # Lets the pod pass the "restricted" Pod Security level; the sidecar needs no unusual syscalls.
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": VOLUME_NAME, "mountPath": MOUNT_PATH}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if settings.image_pull_policy:
        container["imagePullPolicy"] = settings.image_pull_policy
    if settings.native:
        container["restartPolicy"] = "Always"
    return container


def _escape(key: str) -> str:
    """A JSON Pointer reference token (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


def sidecar_patch(pod: Pod, settings: SidecarSettings) -> Patch:
    """The JSONPatch that adds the sidecar (first among initContainers when native, else first among
    containers) and the objfs-tmp emptyDir (unless the pod has one)."""
    metadata = pod.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    spec = pod.get("spec") or {}
    container = sidecar_container(settings, sidecar_resources(annotations))
    ops: Patch = []
    if settings.native:
        if spec.get("initContainers"):
            ops.append({"op": "add", "path": "/spec/initContainers/0", "value": container})
        else:
            ops.append({"op": "add", "path": "/spec/initContainers", "value": [container]})
    else:
        containers = spec.get("containers") or []
        ops.append({"op": "add", "path": "/spec/containers/0", "value": container} if containers
                   else {"op": "add", "path": "/spec/containers", "value": [container]})
        # kubectl logs/exec pick the first container unless told: keep pointing at the pod's own.
        if containers and DEFAULT_CONTAINER_ANNOTATION not in annotations and containers[0].get("name"):
            first = containers[0]["name"]
            if "annotations" in metadata and metadata["annotations"] is not None:
                ops.append({"op": "add", "path": f"/metadata/annotations/{_escape(DEFAULT_CONTAINER_ANNOTATION)}",
                            "value": first})
            elif "metadata" in pod:
                ops.append({"op": "add", "path": "/metadata/annotations",
                            "value": {DEFAULT_CONTAINER_ANNOTATION: first}})
    volumes = spec.get("volumes")
    if not any(v.get("name") == VOLUME_NAME for v in volumes or []):
        tmp = {"name": VOLUME_NAME, "emptyDir": {}}
        ops.append({"op": "add", "path": "/spec/volumes/-", "value": tmp} if volumes
                   else {"op": "add", "path": "/spec/volumes", "value": [tmp]})
    return ops
