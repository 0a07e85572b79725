"""A Kubernetes API emulator for Lumen's tests: PyPI kmock 0.8, with the fixes a real client
needs (see ../shared/PEERS.md, "kmock as shipped"), serving the kinds `lumen control --kube`
watches on 127.0.0.1.

Usage: kube_api.py  ->  prints "kube-api: http://127.0.0.1:PORT" once it listens, then serves
until stdin closes (so a test that dies takes it along).
"""

import asyncio
import datetime
import sys
import uuid

import attrs
import kmock
from kmock._internal import enums, rendering

RESOURCES = {
    "v1/services": ("Service", "service"),
    "v1/pods": ("Pod", "pod"),
    "discovery.k8s.io/v1/endpointslices": ("EndpointSlice", "endpointslice"),
    "networking.istio.io/v1/virtualservices": ("VirtualService", "virtualservice"),
    "networking.istio.io/v1/destinationrules": ("DestinationRule", "destinationrule"),
    "gateway.networking.k8s.io/v1/httproutes": ("HTTPRoute", "httproute"),
    "gateway.networking.k8s.io/v1/grpcroutes": ("GRPCRoute", "grpcroute"),
}


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator plus what clients rely on: resource versions, uids, generations,
    typed lists, apply to a missing object as a create, and core discovery."""

    _version: int = attrs.field(default=0, init=False)

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    async def _handle(self, request: rendering.Request):
        if request.resource is not None and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if request.action == enums.action.UPDATE and request.name is not None:
                key = (request.resource, request.namespace, request.name)
                missing = key not in self._objects or self._objects[key].deleted
                if missing and request.subresource is None:
                    # An apply (or patch) of an object that is not there yet creates it.
                    meta.setdefault("name", request.name)
                    if request.namespace:
                        meta.setdefault("namespace", request.namespace)
                    request = attrs.evolve(request, action=enums.action.CREATE)
                elif not missing:
                    meta["resourceVersion"] = self._next_version()
                    if request.subresource is None and "spec" in request.data:
                        current = self._objects[key].get("metadata", {}).get("generation", 1)
                        meta["generation"] = current + 1
            if request.action == enums.action.CREATE:
                meta["resourceVersion"] = self._next_version()
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("generation", 1)
                meta.setdefault(
                    "creationTimestamp",
                    datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                )
                if request.namespace:
                    meta.setdefault("namespace", request.namespace)
        return await super()._handle(request)

    async def _serve_list(self, request: rendering.Request):
        listed = await super()._serve_list(request)
        info = self.resources[request.resource]
        group = request.resource.group
        version = request.resource.version
        listed["apiVersion"] = f"{group}/{version}" if group else version
        listed["kind"] = f"{info.kind}List"
        listed["metadata"] = {"resourceVersion": str(self._version)}
        return listed

    async def _serve_version(self, request: rendering.Request):
        served = await super()._serve_version(request)
        served["groupVersion"] = served["groupVersion"].lstrip("/")
        return served


async def main() -> None:
    emulator = Emulator()
    for path, (kind, singular) in RESOURCES.items():
        emulator.resources[path] = kmock.ResourceInfo(
            kind=kind,
            singular=singular,
            namespaced=True,
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
            subresources={"status"},
        )
    async with emulator, kmock.Server(emulator, host="127.0.0.1") as server:
        print(f"kube-api: http://127.0.0.1:{server.port}", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    asyncio.run(main())
