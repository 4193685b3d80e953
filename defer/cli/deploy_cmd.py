"""`defer deploy`: a shell over defer.deploy (deployment files for a compiled plan)."""

from __future__ import annotations

from pathlib import Path

import click

from defer.deploy.plan import DEFAULT_DEVICE_DIR, DEFAULT_GATEWAY_IMAGE, DEFAULT_IMAGE

NEXT_STEPS = {
    "compose": ("cd {out} && docker compose --profile dispatch up   "
                "(podman-compose works too; `--profile gateway up -d` for the gateway)"),
    "k8s": ("copy each bundle to {device_dir}/ on its device, then: kubectl apply -k {out}"),
    "systemd": ("on device i: copy its bundle to {device_dir}/, node-i.env and token to "
                "/etc/defer/ (token: root, 0600), {unit} to /etc/systemd/system/, then "
                "`systemctl enable --now defer-node@i`"),
}


@click.command("deploy")
@click.option("--manifest", "manifest_path", required=True,
              type=click.Path(exists=True, path_type=Path),
              help="manifest.json, or the bundle folder holding it.")
@click.option("--nodes", required=True, metavar="H:P,H:P,...",
              help="One address per stage, in chain order. compose: addresses on this host; "
                   "k8s: H is the device's Kubernetes node name; systemd: the device's address.")
@click.option("--target", required=True, type=click.Choice(["compose", "k8s", "systemd"]),
              help="compose: one host, host network; k8s: a Kustomize base, one Deployment "
                   "pinned per device; systemd: a hardened template unit per device.")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("deployment"), show_default=True,
              help="Folder to write into (created; files of the same name are replaced; an "
                   "existing token file is kept).")
@click.option("--name", default="defer", show_default=True,
              help="The compose project's name; prefix of Kubernetes objects.")
@click.option("--image", default=DEFAULT_IMAGE, show_default=True,
              help="Node image (deploy/Dockerfile, target `node`); also runs the dispatcher.")
@click.option("--gateway-image", default=DEFAULT_GATEWAY_IMAGE, show_default=True,
              help="Gateway image (target `node` built with EXTRAS=serve).")
@click.option("--http-offset", type=int, default=100, show_default=True,
              help="A node's health/metrics port (--http-port) = its port + this.")
@click.option("--device-dir", default=DEFAULT_DEVICE_DIR, show_default=True,
              help="Where the bundles lie on each device (k8s hostPath, systemd).")
@click.option("--count", type=int, default=100, show_default=True,
              help="Inferences the compose dispatcher streams.")
def deploy(manifest_path: Path, nodes: str, target: str, out_dir: Path, name: str, image: str,
           gateway_image: str, http_offset: int, device_dir: str, count: int) -> None:
    """Write deployment files for the compiled plan in --manifest: one service per stage
    serving its bundle, the chain in stage order, node addresses filled in, and the token
    read from a file (a fresh random one is written the first time, mode 0600)."""
    from defer.deploy import DeployOptions, write_deployment
    from defer.deploy.systemd import NODE_UNIT

    options = DeployOptions(name=name, image=image, gateway_image=gateway_image,
                            http_offset=http_offset, device_dir=device_dir, count=count)
    written = write_deployment(manifest_path, nodes, target, out_dir, options)
    for path in written:
        click.echo(f"wrote {path}")
    click.echo("next: " + NEXT_STEPS[target].format(out=out_dir, device_dir=device_dir,
                                                     unit=NODE_UNIT))
