"""What every deployment target needs to know about one compiled plan on one fleet.

`build_deploy_plan` reads the manifest, pairs stage i with the i-th node address, checks each
bundle file against the manifest's sha256 (a stale folder fails here, not on the fleet) and
gives each node its health/metrics HTTP port (its data port + `http_offset`). The targets
(compose, kubernetes, systemd) turn a DeployPlan into files and never re-read the manifest.

Health endpoint contract of `defer serve --http-port P`: GET /health/live is 200 while the
process runs, GET /health/ready is 200 once a bundle is loaded (503 before), GET /metrics is
Prometheus text. The gateway: `defer gateway --manifest M --nodes H:P,... --http-port 8000
--grpc-port 8001 --metrics-port 8002`, with the Open Inference Protocol's /v2/health/* paths.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from defer.address import format_address, parse_address, parse_address_list
from defer.errors import ManifestError, UsageError
from defer.manifest import Manifest, load_manifest

DEFAULT_IMAGE = "localhost/defer-node:latest"
DEFAULT_GATEWAY_IMAGE = "localhost/defer-gateway:latest"
DEFAULT_DEVICE_DIR = "/opt/defer/bundles"
GATEWAY_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
TOKEN_VARIABLE = "DEFER_TOKEN"


@dataclass(frozen=True)
class NodeSpec:
    """One stage on one device: where it listens and which bundle it serves."""

    stage: int
    host: str
    port: int
    http_port: int
    bundle: str  # file name, relative to the manifest's folder
    sha256: str

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)


@dataclass(frozen=True)
class DeployOptions:
    """Choices the generated files share; the defaults suit `deploy/Dockerfile`'s images."""

    name: str = "defer"  # compose project name, prefix of Kubernetes objects
    image: str = DEFAULT_IMAGE
    gateway_image: str = DEFAULT_GATEWAY_IMAGE
    http_offset: int = 100  # a node's health/metrics port = its data port + this
    device_dir: str = DEFAULT_DEVICE_DIR  # where bundles lie on each device (systemd, k8s)
    count: int = 100  # inferences the compose dispatcher streams


@dataclass(frozen=True)
class DeployPlan:
    manifest: Manifest
    nodes: list[NodeSpec]
    options: DeployOptions = field(default_factory=DeployOptions)

    @property
    def manifest_path(self) -> Path:
        assert self.manifest.path is not None
        return self.manifest.path

    @property
    def addresses(self) -> list[str]:
        return [node.address for node in self.nodes]

    @property
    def model_name(self) -> str:
        return str(self.manifest.model.get("name", "model"))

    def sha256sums(self) -> str:
        """`sha256sum -c` input for the bundles (checked on a device before starting it)."""
        return "".join(f"{n.sha256}  {n.bundle}\n" for n in self.nodes)


def build_deploy_plan(manifest_path: str | Path, nodes: str | list[str],
                      options: DeployOptions | None = None) -> DeployPlan:
    """Check the manifest, the bundles and the addresses; UsageError/ManifestError name the fix."""
    options = options or DeployOptions()
    _check_options(options)
    manifest = load_manifest(manifest_path)
    addresses = parse_address_list(nodes) if isinstance(nodes, str) else nodes
    n_stages = len(manifest.stages)
    if len(addresses) != n_stages:
        raise UsageError(f"--nodes has {len(addresses)} address(es) but the plan has {n_stages} "
                         f"stages; give one host:port per stage, in chain order")
    specs = []
    for stage, address in zip(manifest.stages, addresses):
        host, port = parse_address(address)
        _check_bundle(manifest, stage.index)
        specs.append(NodeSpec(stage.index, host, port, port + options.http_offset,
                              stage.file, stage.sha256))
    _check_ports(specs)
    return DeployPlan(manifest, specs, options)


def _check_options(options: DeployOptions) -> None:
    if not re.fullmatch(r"[a-z]([a-z0-9-]{0,30}[a-z0-9])?", options.name):
        raise UsageError(f"--name {options.name!r}: use lower-case letters, digits and '-' "
                         "(it names the compose project and Kubernetes objects)")
    if not 0 < options.http_offset < 65535:
        raise UsageError(f"--http-offset {options.http_offset}: need 1..65534")
    if not options.device_dir.startswith("/"):
        raise UsageError(f"--device-dir {options.device_dir!r}: need an absolute path")
    if options.count < 1:
        raise UsageError(f"--count {options.count}: need at least 1")


def _check_bundle(manifest: Manifest, index: int) -> None:
    path = manifest.bundle_path(index)
    if not path.is_file():
        raise ManifestError(f"{path}: bundle of stage {index} is missing; recompile with "
                            "`defer compile` or point --manifest at the complete folder")
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != manifest.stages[index].sha256:
        raise ManifestError(f"{path}: sha256 differs from the manifest's stage {index}; the "
                            "folder mixes two compiles, recompile with `defer compile`")


def _check_ports(nodes: list[NodeSpec]) -> None:
    used: dict[tuple[str, int], str] = {}
    for node in nodes:
        if node.http_port > 65535:
            raise UsageError(f"{node.address}: port + --http-offset is {node.http_port}, above "
                             "65535; use a lower port or offset")
        for port, what in ((node.port, "data"), (node.http_port, "health")):
            key = (node.host, port)
            if key in used:
                raise UsageError(f"{format_address(*key)} is both {used[key]} and stage "
                                 f"{node.stage}'s {what} port; give distinct ports "
                                 "(or another --http-offset)")
            used[key] = f"stage {node.stage}'s {what} port"
