"""Layers import downward only: an edge node's runtime never imports the compiler (nor
TensorFlow), and no module of defer/ outgrows one job."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _imported(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(sorted(sys.modules))"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own printed list


def test_the_runtime_imports_no_compiler_and_no_tensorflow():
    modules = _imported("import defer.runtime.node, defer.runtime.dispatcher")
    assert [m for m in modules if m.startswith("defer.compiler")] == []
    assert "tensorflow" not in modules and "tf2onnx" not in modules


def test_serving_a_node_from_the_cli_loads_no_compiler():
    modules = _imported("from defer.cli import main\nmain.get_command(None, 'serve')")
    assert [m for m in modules if m.startswith("defer.compiler")] == []


def test_no_runtime_source_names_the_compiler():
    for path in (ROOT / "defer" / "runtime").rglob("*.py"):
        assert "defer.compiler" not in path.read_text(), path


def test_every_module_has_a_docstring_and_stays_small():
    for path in (ROOT / "defer").rglob("*.py"):
        text = path.read_text()
        assert len(text.splitlines()) <= 400, f"{path} has over 400 lines"
        if text.strip():
            assert text.lstrip().startswith('"""'), f"{path} lacks a module docstring"
