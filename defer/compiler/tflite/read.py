"""Read a `.tflite` file: parse the flatbuffer, refuse what defer cannot cut, analyse the rest.

Only single-subgraph models made of builtin ops are accepted: several subgraphs (WHILE, IF,
CALL...), resource variables and Flex/custom ops are refused with a one-line UsageError naming
the fix, and so is a corrupt flatbuffer (LiteRT's own verifier reads it first).
"""

from __future__ import annotations

from pathlib import Path

from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils

from defer.compiler.tflite.graph import OP_NAMES, TFLiteGraph, analyse, op_type
from defer.errors import UsageError

_RESOURCE_OPS = {"VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE", "CALL_ONCE"}


def read_tflite(source: str | Path | bytes | bytearray, batch: int = 1) -> TFLiteGraph:
    """Parse, check and analyse a `.tflite` file (or its bytes)."""
    where = str(source) if isinstance(source, str | Path) else "the model"
    data = _read_bytes(source)
    model = _parse(data, where)
    _check_supported(model, where)
    return analyse(model, data, batch)


def _read_bytes(source: str | Path | bytes | bytearray) -> bytes:
    if not isinstance(source, str | Path):
        return bytes(source)
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"{path}: no such file; check the model path")
    return path.read_bytes()


def _parse(data: bytes, where: str) -> schema.ModelT:
    """The object tree of a flatbuffer LiteRT accepts, or a UsageError saying it is not one."""
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise UsageError(f"{where}: not a TFLite model (no TFL3 identifier); "
                         "pass a .tflite file written by the TFLite converter")
    from ai_edge_litert.interpreter import Interpreter

    try:
        Interpreter(model_content=data)  # runs the flatbuffer verifier; nothing is allocated
        return flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    except Exception as err:  # noqa: BLE001 - a corrupt buffer raises anything from anywhere
        reason = " ".join(str(err).split()) or type(err).__name__
        raise UsageError(f"{where}: a corrupt or unreadable TFLite flatbuffer ({reason}); "
                         "convert the model again") from None


def _check_supported(model: schema.ModelT, where: str) -> None:
    count = len(model.subgraphs or [])
    if count != 1:
        raise UsageError(f"{where}: has {count} subgraphs (control flow such as WHILE, IF or "
                         "CALL); defer cuts single-subgraph models only: convert a model "
                         "without control flow")
    types = [op_type(model, op) for op in model.subgraphs[0].operators or []]
    builtins = set(OP_NAMES.values())
    resource = sorted(set(types) & _RESOURCE_OPS)
    if resource:
        raise UsageError(f"{where}: uses resource variables ({', '.join(resource)}); defer "
                         "cuts stateless models only: convert without variables")
    flex = sorted({t for t in types if t.startswith("Flex")})
    if flex:
        raise UsageError(f"{where}: uses TensorFlow (Flex) ops {', '.join(flex)}, which LiteRT "
                         "alone cannot run; convert with supported_ops=[TFLITE_BUILTINS] only")
    custom = sorted({t for t in types if t not in builtins})
    if custom:
        raise UsageError(f"{where}: uses custom ops {', '.join(custom)}; defer cuts models of "
                         "builtin ops only")
