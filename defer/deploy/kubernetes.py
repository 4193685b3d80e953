"""`defer deploy --target k8s`: a small Kustomize base for one chain (`kubectl apply -k DIR`).

In `--nodes H:P,...`, H is the Kubernetes node (its `kubernetes.io/hostname` label) that runs
the stage, P its port. Each stage is one Deployment (1 replica, Recreate) pinned to its device
with a nodeSelector, serving its bundle from a read-only hostPath (`--device-dir`, where the
bundles were copied on each device), plus a ClusterIP Service `<name>-node-<i>`. The gateway
Deployment gets the manifest from a ConfigMap and reaches the chain through those Services, in
stage order. The token comes from `defer.env` through a generated Secret into DEFER_TOKEN.
Readiness is the node's GET /health/ready (bundle loaded), liveness GET /health/live.
"""

from __future__ import annotations

import json

from defer.deploy.emit import to_yaml, to_yaml_stream
from defer.deploy.plan import GATEWAY_PORTS, TOKEN_VARIABLE, DeployPlan, NodeSpec

ENV_FILE = "defer.env"
MANIFEST_MOUNT = "/etc/defer"
RUN_AS = 10001  # the image's `defer` user


def kubernetes_files(plan: DeployPlan) -> dict[str, str]:
    """{file name: text}: kustomization.yaml, node-<i>.yaml, gateway.yaml, manifest.json."""
    files = {f"node-{n.stage}.yaml": to_yaml_stream([_node_deployment(plan, n),
                                                     _node_service(plan, n)])
             for n in plan.nodes}
    files["gateway.yaml"] = to_yaml_stream([_gateway_deployment(plan), _gateway_service(plan)])
    files["manifest.json"] = json.dumps(plan.manifest.to_dict(), indent=2) + "\n"
    files["kustomization.yaml"] = to_yaml(_kustomization(plan, sorted(
        name for name in files if name.endswith(".yaml"))))
    return files


def _labels(plan: DeployPlan, component: str, stage: int | None = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "defer", "app.kubernetes.io/instance": plan.options.name,
              "app.kubernetes.io/component": component}
    if stage is not None:
        labels["defer/stage"] = str(stage)
    return labels


def _node_name(plan: DeployPlan, node: NodeSpec) -> str:
    return f"{plan.options.name}-node-{node.stage}"


def _token_env(plan: DeployPlan) -> list[dict]:
    return [{"name": TOKEN_VARIABLE, "valueFrom": {"secretKeyRef": {
        "name": f"{plan.options.name}-token", "key": TOKEN_VARIABLE}}}]


def _security() -> tuple[dict, dict]:
    pod = {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS,
           "seccompProfile": {"type": "RuntimeDefault"}}
    container = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                 "capabilities": {"drop": ["ALL"]}}
    return pod, container


def _probe(path: str, port: str, period: int) -> dict:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period,
            "timeoutSeconds": 2, "failureThreshold": 3}


def _node_deployment(plan: DeployPlan, node: NodeSpec) -> dict:
    labels = _labels(plan, "node", node.stage)
    pod_security, container_security = _security()
    container = {
        "name": "node",
        "image": plan.options.image,
        "args": [f"/bundles/{node.bundle}", "--host", "0.0.0.0", "--port", str(node.port),
                 "--http-port", str(node.http_port)],
        "env": _token_env(plan),
        "ports": [{"name": "defer", "containerPort": node.port},
                  {"name": "http", "containerPort": node.http_port}],
        "readinessProbe": _probe("/health/ready", "http", 5),
        "livenessProbe": _probe("/health/live", "http", 10),
        "securityContext": container_security,
        "volumeMounts": [{"name": "bundles", "mountPath": "/bundles", "readOnly": True}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": _node_name(plan, node), "labels": labels,
                     "annotations": {"defer/bundle": node.bundle,
                                     "defer/bundle-sha256": node.sha256,
                                     "defer/next-hop": _next_hop(plan, node)}},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},  # one device, one stage: never two at once
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {
                "nodeSelector": {"kubernetes.io/hostname": node.host},
                "securityContext": pod_security,
                "containers": [container],
                "volumes": [{"name": "bundles", "hostPath": {
                    "path": plan.options.device_dir, "type": "Directory"}}],
            }},
        },
    }


def _next_hop(plan: DeployPlan, node: NodeSpec) -> str:
    if node.stage + 1 < len(plan.nodes):
        return _service_address(plan, plan.nodes[node.stage + 1])
    return "gateway"


def _service_address(plan: DeployPlan, node: NodeSpec) -> str:
    return f"{_node_name(plan, node)}:{node.port}"


def _node_service(plan: DeployPlan, node: NodeSpec) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": _node_name(plan, node), "labels": _labels(plan, "node", node.stage)},
        "spec": {"selector": _labels(plan, "node", node.stage), "ports": [
            {"name": "defer", "port": node.port, "targetPort": "defer"},
            {"name": "http", "port": node.http_port, "targetPort": "http"}]},
    }


def _gateway_deployment(plan: DeployPlan) -> dict:
    labels = _labels(plan, "gateway")
    pod_security, container_security = _security()
    nodes = ",".join(_service_address(plan, n) for n in plan.nodes)
    ports = [item for name, port in GATEWAY_PORTS.items()
             for item in (f"--{name}-port", str(port))]
    container = {
        "name": "gateway",
        "image": plan.options.gateway_image,
        "command": ["defer", "gateway"],
        "args": ["--manifest", f"{MANIFEST_MOUNT}/manifest.json", "--nodes", nodes,
                 "--host", "0.0.0.0", *ports],
        "env": _token_env(plan),
        "ports": [{"name": name, "containerPort": port} for name, port in GATEWAY_PORTS.items()],
        "readinessProbe": _probe("/v2/health/ready", "http", 5),
        "livenessProbe": _probe("/v2/health/live", "http", 10),
        "securityContext": container_security,
        "volumeMounts": [{"name": "manifest", "mountPath": MANIFEST_MOUNT, "readOnly": True}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": f"{plan.options.name}-gateway", "labels": labels,
                     "annotations": {"defer/chain": nodes}},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": {
                     "securityContext": pod_security,
                     "containers": [container],
                     "volumes": [{"name": "manifest",
                                  "configMap": {"name": f"{plan.options.name}-manifest"}}]}}},
    }


def _gateway_service(plan: DeployPlan) -> dict:
    labels = _labels(plan, "gateway")
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"{plan.options.name}-gateway", "labels": labels},
            "spec": {"selector": labels, "ports": [
                {"name": name, "port": port, "targetPort": name}
                for name, port in GATEWAY_PORTS.items()]}}


def _kustomization(plan: DeployPlan, resources: list[str]) -> dict:
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "labels": [{"pairs": {"app.kubernetes.io/part-of": "defer"}}],
        "resources": resources,
        "configMapGenerator": [{"name": f"{plan.options.name}-manifest",
                                "files": ["manifest.json"]}],
        "secretGenerator": [{"name": f"{plan.options.name}-token", "envs": [ENV_FILE]}],
    }
