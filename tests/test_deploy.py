"""`defer deploy`: the generated files agree with the manifest they were made from.

For every target: each stage's service serves that stage's bundle file and names its sha256,
the chain is wired in stage order at the given addresses and ports, the token comes from a
file (0600) and never appears on a command line or in any other file. Plus the one-line errors.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from runtime_helpers import compile_tiny, residual_mlp

from defer.cli import main
from defer.deploy import DeployOptions, build_deploy_plan, deployment_files
from defer.deploy.emit import to_yaml
from defer.deploy.systemd import NODE_UNIT, NODE_UNIT_TEXT
from defer.manifest import Manifest

NODES = ["127.0.0.1:7001", "127.0.0.1:7002", "[::1]:7003"]
DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Manifest:
    return compile_tiny(residual_mlp(), tmp_path_factory.mktemp("bundles"),
                        cuts=("relu1", "mm2"))


def deploy(manifest: Manifest, target: str, out: Path, *extra: str, nodes=NODES):
    return CliRunner().invoke(main, ["deploy", "--manifest", str(manifest.path), "--nodes",
                                     ",".join(nodes), "--target", target, "-o", str(out),
                                     *extra])


def generated(manifest: Manifest, target: str, out: Path) -> dict[str, str]:
    result = deploy(manifest, target, out)
    assert result.exit_code == 0, result.output
    return {p.name: p.read_text() for p in out.iterdir()}


def token_of(files: dict[str, str], secret: str) -> str:
    return files[secret].strip().removeprefix("DEFER_TOKEN=")


def check_secret(files: dict[str, str], out: Path, secret: str) -> None:
    token = token_of(files, secret)
    assert len(token) >= 32
    assert stat.S_IMODE((out / secret).stat().st_mode) == 0o600
    assert not [name for name, text in files.items() if name != secret and token in text]


def check_sums(files: dict[str, str], manifest: Manifest) -> None:
    assert files["SHA256SUMS"].splitlines() == [f"{s.sha256}  {s.file}" for s in manifest.stages]


def test_compose_serves_each_bundle_in_chain_order(manifest, tmp_path):
    files = generated(manifest, "compose", tmp_path / "c")
    check_secret(files, tmp_path / "c", "defer.env")
    check_sums(files, manifest)
    services = yaml.safe_load(files["compose.yaml"])["services"]
    for stage, address in zip(manifest.stages, NODES):
        node = services[f"node-{stage.index}"]
        host, port = address.rsplit(":", 1)
        assert node["command"] == [f"/bundles/{stage.file}", "--host", host.strip("[]"),
                                   "--port", port, "--http-port", str(int(port) + 100)]
        assert node["labels"]["defer.bundle.sha256"] == stage.sha256
        assert node["env_file"] == ["defer.env"] and node["network_mode"] == "host"
        assert node["volumes"][0].endswith(":/bundles:ro")
        assert f":{int(port) + 100}/health/ready" in node["healthcheck"]["test"][-1]
    mount = services["node-0"]["volumes"][0].split(":")[0]
    assert (tmp_path / "c" / mount).resolve() == manifest.path.parent.resolve()
    for name in ("dispatcher", "gateway"):
        command = services[name]["command"]
        assert command[command.index("--nodes") + 1] == ",".join(NODES)
        assert command[command.index("--manifest") + 1] == "/bundles/manifest.json"
        assert set(services[name]["depends_on"]) == {f"node-{s.index}" for s in manifest.stages}
    for service in services.values():
        assert "--token" not in service["command"] + service.get("entrypoint", [])


def test_kubernetes_pins_each_stage_to_its_device(manifest, tmp_path):
    devices = ["jetson-a:7000", "jetson-b:7000", "pi-c:7010"]
    result = deploy(manifest, "k8s", tmp_path / "k", nodes=devices)
    assert result.exit_code == 0, result.output
    files = {p.name: p.read_text() for p in (tmp_path / "k").iterdir()}
    check_secret(files, tmp_path / "k", "defer.env")
    check_sums(files, manifest)
    kustomization = yaml.safe_load(files["kustomization.yaml"])
    assert kustomization["resources"] == ["gateway.yaml", "node-0.yaml", "node-1.yaml",
                                          "node-2.yaml"]
    assert kustomization["secretGenerator"][0]["envs"] == ["defer.env"]
    services = []
    for stage, device in zip(manifest.stages, devices):
        deployment, service = yaml.safe_load_all(files[f"node-{stage.index}.yaml"])
        host, port = device.split(":")
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert pod["nodeSelector"] == {"kubernetes.io/hostname": host}
        assert container["args"][0] == f"/bundles/{stage.file}"
        assert deployment["metadata"]["annotations"]["defer/bundle-sha256"] == stage.sha256
        assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
        assert container["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "defer-token"
        assert service["spec"]["ports"][0]["port"] == int(port)
        services.append(f"{service['metadata']['name']}:{port}")
    gateway, _ = yaml.safe_load_all(files["gateway.yaml"])
    args = gateway["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--nodes") + 1] == ",".join(services)
    assert Manifest.from_dict(yaml.safe_load(files["manifest.json"])).to_dict() == \
        manifest.to_dict()
    assert "--token" not in files["gateway.yaml"] + "".join(files[f"node-{i}.yaml"]
                                                            for i in range(3))


def test_systemd_reads_the_token_from_its_credential(manifest, tmp_path):
    files = generated(manifest, "systemd", tmp_path / "s")
    check_secret(files, tmp_path / "s", "token")
    check_sums(files, manifest)
    unit = files[NODE_UNIT]
    for line in ("DynamicUser=yes", "ProtectSystem=strict", "NoNewPrivileges=yes",
                 "Restart=on-failure", "LoadCredential=token:/etc/defer/token"):
        assert line in unit.splitlines()
    assert "Environment=DEFER_TOKEN_FILE=%d/token" in unit.splitlines()
    assert "--token" not in unit and "sh -c" not in unit
    for stage, address in zip(manifest.stages, NODES):
        env = dict(line.split("=", 1) for line in files[f"node-{stage.index}.env"].splitlines()
                   if not line.startswith("#"))
        host, port = address.rsplit(":", 1)
        assert env == {"DEFER_BUNDLE": f"/opt/defer/bundles/{stage.file}",
                       "DEFER_HOST": host.strip("[]"), "DEFER_PORT": port,
                       "DEFER_HTTP_PORT": str(int(port) + 100)}
        assert stage.sha256 in files[f"node-{stage.index}.env"]
    assert f"DEFER_NODES={','.join(NODES)}" in files["gateway.env"].splitlines()


def test_a_second_run_keeps_the_token(manifest, tmp_path):
    first = generated(manifest, "compose", tmp_path / "c")
    second = generated(manifest, "compose", tmp_path / "c")
    assert first == second


def test_committed_unit_is_the_generated_one():
    assert (DEPLOY / "systemd" / NODE_UNIT).read_text() == NODE_UNIT_TEXT


@pytest.mark.parametrize("nodes, message", [
    (NODES[:2], "--nodes has 2 address(es) but the plan has 3 stages"),
    (["127.0.0.1:7001", "127.0.0.1:7001", "127.0.0.1:7003"], "127.0.0.1:7001 is both"),
    (["127.0.0.1:7001", "127.0.0.1:7101", "127.0.0.1:7003"], "127.0.0.1:7101 is both"),
    (["127.0.0.1", "127.0.0.1:7002", "127.0.0.1:7003"], "bad node address"),
])
def test_bad_nodes_fail_with_one_line(manifest, tmp_path, nodes, message):
    result = deploy(manifest, "compose", tmp_path / "c", nodes=nodes)
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_a_bundle_from_another_compile_is_refused(manifest, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in manifest.path.parent.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / manifest.stages[1].file).write_bytes(b"not this plan's bundle")
    result = CliRunner().invoke(main, ["deploy", "--manifest", str(copy), "--nodes",
                                       ",".join(NODES), "--target", "k8s", "-o",
                                       str(tmp_path / "k")])
    assert result.exit_code == 2
    assert "sha256 differs from the manifest's stage 1" in result.output


def test_options_are_checked_before_anything_is_written(manifest, tmp_path):
    for options, message in [(DeployOptions(name="Bad_Name"), "--name"),
                             (DeployOptions(device_dir="rel/dir"), "--device-dir"),
                             (DeployOptions(http_offset=0), "--http-offset")]:
        with pytest.raises(Exception, match=message):
            build_deploy_plan(manifest.path, NODES, options)
    plan = build_deploy_plan(manifest.path, NODES, DeployOptions(name="edge", http_offset=1000))
    files = deployment_files(plan, "k8s", tmp_path)
    assert "name: edge-node-2" in files["node-2.yaml"] and "8003" in files["node-2.yaml"]


@pytest.mark.parametrize("value", ["7000", "true", "no", "0.0.0.0", "a: b", "#c", "-1", "",
                                   "--host", "x y", "@x", "1e3", ".inf", "[::1]:7"])
def test_yaml_scalars_read_back_as_written(value):
    document = {"k": [value, {"v": value}], value or "empty": {"n": 7, "b": False, "z": None}}
    assert yaml.safe_load(to_yaml(document)) == document


def test_committed_examples_agree_with_their_manifest():
    """deploy/compose, deploy/k8s and deploy/systemd were written for one plan (deploy/README)."""
    stages = Manifest.from_dict(yaml.safe_load((DEPLOY / "k8s" / "manifest.json").read_text()))
    sums = [f"{s.sha256}  {s.file}" for s in stages.stages]
    for target in ("compose", "k8s", "systemd"):
        assert (DEPLOY / target / "SHA256SUMS").read_text().splitlines() == sums
    services = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())["services"]
    for stage in stages.stages:
        assert services[f"node-{stage.index}"]["labels"]["defer.bundle.sha256"] == stage.sha256
        assert stage.sha256 in (DEPLOY / "k8s" / f"node-{stage.index}.yaml").read_text()
        assert stage.sha256 in (DEPLOY / "systemd" / f"node-{stage.index}.env").read_text()
