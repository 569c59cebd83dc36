"""CSI Identity service."""

from __future__ import annotations

import os
import threading
from importlib import metadata

import grpc
from google.protobuf import wrappers_pb2

from csi.v1 import csi_pb2, csi_pb2_grpc

DRIVER_NAME = "objfs.csi.dev"


def package_version() -> str:
    try:
        return metadata.version("objfs-csi")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def fuse_usable() -> bool:
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, name: str = DRIVER_NAME, needs_fuse: bool = True,
                 warmed: threading.Event | None = None) -> None:
        self.name = name
        self.needs_fuse = needs_fuse  # a controller-only plugin never mounts
        self.warmed = warmed  # set once the node plugin can start servers at full speed (its zygote)

    def GetPluginInfo(self, request: csi_pb2.GetPluginInfoRequest, context: grpc.ServicerContext
                      ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=self.name, vendor_version=package_version())

    def GetPluginCapabilities(self, request: csi_pb2.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
                              ) -> csi_pb2.GetPluginCapabilitiesResponse:
        service = csi_pb2.PluginCapability.Service(type=csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE)
        # ONLINE: ControllerExpandVolume only records the size (object storage has none), so a
        # volume in use grows as well as one that is not; there is nothing to do on the node.
        expansion = csi_pb2.PluginCapability.VolumeExpansion(type=csi_pb2.PluginCapability.VolumeExpansion.ONLINE)
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=[
            csi_pb2.PluginCapability(service=service), csi_pb2.PluginCapability(volume_expansion=expansion),
        ])

    def Probe(self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext) -> csi_pb2.ProbeResponse:
        ready = fuse_usable() if self.needs_fuse else True
        if self.warmed is not None and not self.warmed.is_set():
            ready = False  # still importing what servers need: a publish now would wait for it
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=ready))
