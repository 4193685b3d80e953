"""The deployment files pass the real validators, offline; each check skips when its tool is
missing (`.ci/run` installs them: see deploy/README.md).

- compose: the compose-spec JSON schema (vendored by check-jsonschema, from PyPI), and
  `podman-compose config` (podman-compose >= 1.1 from PyPI; needs podman);
- Kubernetes: `kubectl kustomize` renders the base (generators included), then every object
  is checked against the Kubernetes OpenAPI schemas by kubernetes-validate (PyPI), strictly;
- systemd: `systemd-analyze verify` prints nothing (it warns, exit 0, on unknown keys).

Both a freshly generated plan and the files committed under deploy/ are checked.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from runtime_helpers import compile_tiny, residual_mlp

from defer.deploy import write_deployment

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
NODES = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]


@pytest.fixture(scope="module")
def manifest_path(tmp_path_factory) -> Path:
    return compile_tiny(residual_mlp(), tmp_path_factory.mktemp("bundles"),
                        cuts=("relu1", "mm2")).path


def generate(manifest_path: Path, target: str, out: Path) -> Path:
    write_deployment(manifest_path, NODES, target, out)
    return out


def committed(name: str, tmp_path: Path) -> Path:
    """A copy of deploy/<name> with the secret file a user would add."""
    folder = shutil.copytree(DEPLOY / name, tmp_path / name)
    (folder / "defer.env").write_text("DEFER_TOKEN=not-a-real-token\n")
    return folder


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


# compose -------------------------------------------------------------------------------------

def compose_schema_check(folder: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    check_jsonschema = pytest.importorskip("check_jsonschema")
    schema_path = (Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor"
                   / "compose-spec.json")
    schema = json.loads(schema_path.read_text())
    document = yaml.safe_load((folder / "compose.yaml").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]
    assert not errors


def podman_compose_check(folder: Path) -> None:
    if not (shutil.which("podman-compose") and shutil.which("podman")):
        pytest.skip("podman-compose or podman not installed")
    result = run("podman-compose", "-f", "compose.yaml", "--profile", "dispatch", "config",
                 cwd=folder)
    if "invalid choice: 'config'" in result.stderr:
        pytest.skip("this podman-compose has no `config` (Debian 12's 1.0.3); PyPI's has")
    assert result.returncode == 0, result.stderr
    assert "dispatcher" in yaml.safe_load(result.stdout)["services"]


def test_compose_matches_the_compose_spec(manifest_path, tmp_path):
    compose_schema_check(generate(manifest_path, "compose", tmp_path / "c"))
    compose_schema_check(committed("compose", tmp_path))


def test_compose_schema_check_catches_a_mistake(manifest_path, tmp_path):
    folder = generate(manifest_path, "compose", tmp_path / "c")
    text = (folder / "compose.yaml").read_text().replace("restart:", "restrat:")
    (folder / "compose.yaml").write_text(text)
    with pytest.raises(AssertionError, match="restrat"):
        compose_schema_check(folder)


def test_podman_compose_config_accepts_it(manifest_path, tmp_path):
    podman_compose_check(generate(manifest_path, "compose", tmp_path / "c"))
    podman_compose_check(committed("compose", tmp_path))


# Kubernetes ----------------------------------------------------------------------------------

def kubernetes_objects(folder: Path) -> list[dict]:
    """The rendered base: `kubectl kustomize` when kubectl exists, else the resource files."""
    if shutil.which("kubectl"):
        result = run("kubectl", "kustomize", str(folder))
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    resources = yaml.safe_load((folder / "kustomization.yaml").read_text())["resources"]
    return [doc for name in resources for doc in yaml.safe_load_all((folder / name).read_text())]


def kubernetes_check(folder: Path) -> list[str]:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    objects = kubernetes_objects(folder)
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)
    return sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects)


def test_kubernetes_objects_match_the_openapi_schemas(manifest_path, tmp_path):
    kinds = kubernetes_check(generate(manifest_path, "k8s", tmp_path / "k"))
    assert [k for k in kinds if k.startswith("Deployment/")] == [
        "Deployment/defer-gateway", "Deployment/defer-node-0", "Deployment/defer-node-1",
        "Deployment/defer-node-2"]
    kubernetes_check(committed("k8s", tmp_path))


def test_kubernetes_check_catches_a_mistake(manifest_path, tmp_path):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    folder = generate(manifest_path, "k8s", tmp_path / "k")
    path = folder / "node-1.yaml"
    path.write_text(path.read_text().replace("containerPort: 7002", "containerPort: seven"))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_check(folder)


# systemd -------------------------------------------------------------------------------------

def systemd_check(folder: Path, tmp_path: Path) -> None:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed")
    units = tmp_path / "units"
    units.mkdir(parents=True, exist_ok=True)
    # verify wants the command to exist: point the device's venv at this machine's defer
    here = shutil.which("defer") or sys.executable
    paths = []
    for unit, name in (("defer-node@.service", "defer-node@0.service"),  # an instance
                       ("defer-gateway.service", "defer-gateway.service")):
        if (folder / unit).exists():
            text = (folder / unit).read_text().replace("/opt/defer/bin/defer", here)
            (units / name).write_text(text)
            paths.append(str(units / name))
    result = run("systemd-analyze", "verify", *paths)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stderr


def test_systemd_units_verify(manifest_path, tmp_path):
    systemd_check(generate(manifest_path, "systemd", tmp_path / "s"), tmp_path)
    systemd_check(DEPLOY / "systemd", tmp_path / "committed")


def test_systemd_check_catches_a_mistake(manifest_path, tmp_path):
    folder = generate(manifest_path, "systemd", tmp_path / "s")
    unit = folder / "defer-node@.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=sturdy"))
    with pytest.raises(AssertionError, match="sturdy"):
        systemd_check(folder, tmp_path)
