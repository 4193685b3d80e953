"""Deployment files for a compiled plan: compose, Kubernetes (Kustomize) or systemd.

`write_deployment(manifest, nodes, target, out_dir)` checks the plan against its bundles,
writes the target's files plus SHA256SUMS (for `sha256sum -c` on a device), and a fresh random
token file the first time (mode 0600; kept on later runs so a regenerated fleet keeps its
secret). No token is ever written into a unit, a manifest or a command line. Only the manifest
module is read: this package imports neither the compiler nor the runtime.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from defer.deploy.compose import compose_files
from defer.deploy.kubernetes import kubernetes_files
from defer.deploy.plan import (
    TOKEN_VARIABLE,
    DeployOptions,
    DeployPlan,
    NodeSpec,
    build_deploy_plan,
)
from defer.deploy.systemd import TOKEN_FILE, systemd_files
from defer.errors import UsageError

__all__ = ["TARGETS", "DeployOptions", "DeployPlan", "NodeSpec", "build_deploy_plan",
           "deployment_files", "write_deployment"]

class Target(NamedTuple):
    files: Callable[[DeployPlan, Path], dict[str, str]]  # (plan, out_dir) -> {name: text}
    secret_name: str  # where the token goes
    secret_text: Callable[[str], str]  # token -> that file's text


def _env_line(token: str) -> str:
    return f"{TOKEN_VARIABLE}={token}\n"


TARGETS = {
    "compose": Target(compose_files, "defer.env", _env_line),
    "k8s": Target(lambda plan, out: kubernetes_files(plan), "defer.env", _env_line),
    "systemd": Target(lambda plan, out: systemd_files(plan), TOKEN_FILE, lambda t: t + "\n"),
}


def deployment_files(plan: DeployPlan, target: str, out_dir: str | Path) -> dict[str, str]:
    """The target's {file name: text} plus SHA256SUMS, without the secret file."""
    if target not in TARGETS:
        raise UsageError(f"--target {target!r}: choose one of {', '.join(TARGETS)}")
    files = TARGETS[target].files(plan, Path(out_dir))
    files["SHA256SUMS"] = plan.sha256sums()
    return files


def write_deployment(manifest_path: str | Path, nodes: str | list[str], target: str,
                     out_dir: str | Path, options: DeployOptions | None = None) -> list[Path]:
    """Write the target's files into `out_dir`; return their paths (secret file last)."""
    plan = build_deploy_plan(manifest_path, nodes, options)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out}: exists and is not a folder")
    files = deployment_files(plan, target, out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        path = out / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        written.append(path)
    target_spec = TARGETS[target]
    written.append(_ensure_secret(out / target_spec.secret_name, target_spec.secret_text))
    return written


def _ensure_secret(path: Path, text: Callable[[str], str]) -> Path:
    """A new random token, readable by its owner only; an existing file is kept as it is."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as stream:
            stream.write(text(secrets.token_urlsafe(32)))
    return path
