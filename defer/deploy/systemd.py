"""`defer deploy --target systemd`: a hardened template unit for devices without containers.

Device i runs `defer-node@i.service`; its settings are in /etc/defer/node-i.env (bundle path,
address, ports), the token in /etc/defer/token, handed over by LoadCredential= and named to
defer by DEFER_TOKEN_FILE=%d/token (%d: the unit's credentials directory), so it never appears
on a command line (which `ps` shows), in the environment, or in the unit. The gateway (`defer-gateway.service`) gets the
manifest and the chain in stage order from /etc/defer/gateway.env. DEPLOY_UNIT is the file
committed as deploy/systemd/defer-node@.service (a test keeps them equal).
"""

from __future__ import annotations

from defer.deploy.plan import GATEWAY_PORTS, DeployPlan, NodeSpec

NODE_UNIT = "defer-node@.service"
GATEWAY_UNIT = "defer-gateway.service"
TOKEN_FILE = "token"
ETC = "/etc/defer"
VENV = "/opt/defer"  # `python3 -m venv /opt/defer && /opt/defer/bin/pip install defer-edge`

DEFER = VENV + "/bin/defer"

_HARDENING = """\
DynamicUser=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
NoNewPrivileges=yes
CapabilityBoundingSet=
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
UMask=0077
"""


def _unit(comment: str, description: str, env_file: str, command: str) -> str:
    """One hardened service: settings from `env_file`, the token as a credential."""
    return f"""\
{comment}[Unit]
Description={description}
Wants=network-online.target
After=network-online.target

[Service]
Type=exec
EnvironmentFile={ETC}/{env_file}
LoadCredential=token:{ETC}/token
Environment=DEFER_TOKEN_FILE=%d/token
ExecStart={DEFER} {command}
Restart=on-failure
RestartSec=2s
TimeoutStopSec=30s
{_HARDENING}
[Install]
WantedBy=multi-user.target
"""


NODE_UNIT_TEXT = _unit(
    f"""\
# defer node: runs one stage of a compiled plan. Instance %i = the stage index.
# Settings: {ETC}/node-%i.env (DEFER_BUNDLE, DEFER_HOST, DEFER_PORT, DEFER_HTTP_PORT);
# token: {ETC}/token (root-only), handed over with LoadCredential=.
# Written by `defer deploy --target systemd`; also deploy/systemd/defer-node@.service.
""", "defer node, stage %i", "node-%i.env",
    "serve ${DEFER_BUNDLE} --host ${DEFER_HOST} \\\n"
    "    --port ${DEFER_PORT} --http-port ${DEFER_HTTP_PORT}")

GATEWAY_UNIT_TEXT = _unit(
    f"""\
# defer gateway: the Open Inference Protocol in front of one chain of defer nodes.
# Settings: {ETC}/gateway.env (DEFER_MANIFEST, DEFER_NODES in stage order); token as the nodes'.
""", "defer gateway", "gateway.env",
    "gateway --manifest ${DEFER_MANIFEST} \\\n"
    f"    --nodes ${{DEFER_NODES}} --host ${{DEFER_HOST}} --http-port {GATEWAY_PORTS['http']} \\\n"
    f"    --grpc-port {GATEWAY_PORTS['grpc']} --metrics-port {GATEWAY_PORTS['metrics']}")


def systemd_files(plan: DeployPlan) -> dict[str, str]:
    """{file name: text}: the two units, node-<i>.env per stage, gateway.env."""
    files = {NODE_UNIT: NODE_UNIT_TEXT, GATEWAY_UNIT: GATEWAY_UNIT_TEXT}
    for node in plan.nodes:
        files[f"node-{node.stage}.env"] = _node_env(plan, node)
    files["gateway.env"] = (
        f"# defer gateway for {plan.model_name}: the chain in stage order.\n"
        f"DEFER_MANIFEST={plan.options.device_dir}/{plan.manifest_path.name}\n"
        f"DEFER_NODES={','.join(plan.addresses)}\n"
        "DEFER_HOST=127.0.0.1\n")
    return files


def _node_env(plan: DeployPlan, node: NodeSpec) -> str:
    return (f"# defer node {node.address}: stage {node.stage} of {len(plan.nodes)} of "
            f"{plan.model_name}\n# bundle sha256 {node.sha256}\n"
            f"DEFER_BUNDLE={plan.options.device_dir}/{node.bundle}\n"
            f"DEFER_HOST={node.host}\nDEFER_PORT={node.port}\n"
            f"DEFER_HTTP_PORT={node.http_port}\n")
