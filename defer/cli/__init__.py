"""The `defer` command line: thin click shells over the Python API.

Every DeferError becomes one line on stderr and its exit code; no traceback reaches the user
unless `--debug` is given.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from defer import __version__
from defer.errors import DeferError

# command name -> "module:attribute"; a command's module is imported only when it runs (or for
# `defer --help`), so `defer serve` on an edge node never imports the compiler or TensorFlow.
COMMANDS = {
    "compile": "defer.cli.compile_cmd:compile_command",
    "inspect": "defer.cli.compile_cmd:inspect_command",
    "plan": "defer.cli.plan_cmd:plan_command",
    "serve": "defer.cli.runtime_cmd:serve",
    "dispatch": "defer.cli.runtime_cmd:dispatch",
    "run": "defer.cli.runtime_cmd:run",
    "deploy": "defer.cli.deploy_cmd:deploy",
    "gateway": "defer.cli.gateway_cmd:gateway",
    "profile": "defer.cli.profile_cmd:profile_command",
    "doctor": "defer.cli.doctor_cmd:doctor_command",
}


class _DeferGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attribute)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DeferError as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"defer: error: {err}", err=True)
            sys.exit(err.exit_code)


@click.group(cls=_DeferGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="defer")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, verbose: int, debug: bool) -> None:
    """defer: distributed edge inference.

    \b
    defer compile MODEL -n N -o DIR    cut a model into N balanced ONNX or TFLite stages
    defer inspect DIR                  show the plan of a compiled model
    defer plan MODEL --cluster C       what k devices, codecs, one more device would give
    defer serve [BUNDLE]               run one stage on this node
    defer dispatch --manifest M ...    stream inputs through a chain of nodes
    defer run                          everything on this machine, built-in example
    defer deploy --manifest M ...      compose / Kubernetes / systemd files for a plan
    defer profile MODEL --nodes ...    time ops and links on running nodes: cluster.json
    defer doctor --manifest M ...      check that a chain can start on these nodes
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if verbose == 0:
        logging.getLogger("defer").setLevel(logging.INFO)
