"""Scenario: the compiler at scale. Peak RSS and wall time of whole compiles (load, analyse,
profile, plan, export), each in a fresh process so its peak is its own:

- a transformer encoder of >= 8,000 ops built with onnx.helper (seeded random weights; each
  layer also reaches one weight through a Transpose, a constant-only op), at n=16;
- ResNet50 at n=8, with this tree and (with --baseline DIR) with another checkout, same run;
- the op order: wire bytes and slowest stage of InceptionV3 and DenseNet121 at n=4 and n=8
  for each candidate order the compiler planned (file, depth, greedy) and the one it chose
  (--no-profile: FLOP estimates, so the figures are deterministic).

    python -m benchmarks.scale [--baseline /work/main] [--layers 320] [--only NAME ...]

Run it under `flock /tmp/defer-heavy.lock`. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SECTIONS = ("transformer", "resnet50", "order")
_HERE = Path(__file__).resolve()


# --- the model ------------------------------------------------------------------------------


def transformer(layers: int = 320, d_model: int = 64, heads: int = 4, seq: int = 32,
                seed: int = 0):
    """A pre-LayerNorm encoder, about 26 ops per layer, as an onnx.ModelProto (opset 17)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    d_head, ff = d_model // heads, 4 * d_model
    inits, nodes = [], []

    def weight(name, shape, scale=None):
        scale = scale if scale is not None else 1.0 / np.sqrt(shape[0])
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale)
                                             .astype(np.float32), name))
        return name

    def const(name, values, dtype=np.int64):
        inits.append(numpy_helper.from_array(np.array(values, dtype=dtype), name))
        return name

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    split = const("split_heads", [-1, seq, heads, d_head])
    merge = const("merge_heads", [-1, seq, d_model])
    scale = const("scale", 1.0 / np.sqrt(d_head), np.float32)
    ones, zeros = const("ln_g", np.ones(d_model), np.float32), const("ln_b", np.zeros(d_model),
                                                                      np.float32)
    x = "x"
    for i in range(layers):
        p = f"l{i}_"
        h = node("LayerNormalization", [x, ones, zeros], p + "ln1", axis=-1)
        qkv = []
        for part in "qkv":
            m = node("MatMul", [h, weight(p + "w" + part, (d_model, d_model))], p + part)
            b = node("Add", [m, weight(p + "b" + part, (d_model,), 0.02)], p + part + "_b")
            r = node("Reshape", [b, split], p + part + "_split")
            qkv.append(node("Transpose", [r], p + part + "_t",
                            perm=[0, 2, 3, 1] if part == "k" else [0, 2, 1, 3]))
        s = node("MatMul", [qkv[0], qkv[1]], p + "scores")
        s = node("Mul", [s, scale], p + "scaled")
        s = node("Softmax", [s], p + "probs", axis=-1)
        a = node("MatMul", [s, qkv[2]], p + "attn")
        a = node("Transpose", [a], p + "attn_t", perm=[0, 2, 1, 3])
        a = node("Reshape", [a, merge], p + "attn_merged")
        wo = node("Transpose", [weight(p + "wo_t", (d_model, d_model))], p + "wo", perm=[1, 0])
        a = node("MatMul", [a, wo], p + "proj")
        x = node("Add", [x, a], p + "res1")
        h = node("LayerNormalization", [x, ones, zeros], p + "ln2", axis=-1)
        h = node("MatMul", [h, weight(p + "w1", (d_model, ff))], p + "ff1")
        h = node("Add", [h, weight(p + "b1", (ff,), 0.02)], p + "ff1_b")
        h = node("Relu", [h], p + "relu")
        h = node("MatMul", [h, weight(p + "w2", (ff, d_model))], p + "ff2")
        x = node("Add", [x, h], p + "res2")
    nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
    graph = helper.make_graph(
        nodes, "transformer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", seq, d_model])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", seq, d_model])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


# --- one compile in a child process ---------------------------------------------------------


def child(model: str, n: int, profile: bool, order: str | None) -> dict:
    """Compile `model` at n stages in this process; wall seconds, peak RSS and the plan."""
    import resource
    import time

    from defer.compiler import compile_model

    options = {} if order is None else {"order": order}
    with tempfile.TemporaryDirectory(prefix="defer-scale-") as out:
        started = time.perf_counter()
        manifest = compile_model(model, n, out, profile=profile, **options)
        wall = time.perf_counter() - started
    plan = manifest.plan
    return {"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "n_ops": manifest.model.get("n_ops"), "bottleneck_ms": plan["bottleneck"] * 1e3,
            "wire_bytes": plan["wire_bytes"], "op_order": plan.get("op_order", "file"),
            "hop_bytes": [s.bytes_out for s in manifest.stages[:-1]],
            "op_orders": plan.get("op_orders", {})}


def _spawn(model: str, n: int, profile: bool = True, order: str | None = None,
           tree: Path | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree or _HERE.parent.parent))
    args = [sys.executable, str(_HERE), "--child", model, str(n), str(int(profile)),
            order or "-"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"compile of {model} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the sections ---------------------------------------------------------------------------


def run_transformer(layers: int, work: Path) -> dict:
    import onnx

    path = work / "transformer.onnx"
    onnx.save(transformer(layers), path)
    return {"layers": layers, "n16": _spawn(str(path), 16)}


def run_resnet50(baseline: Path | None) -> dict:
    from defer.examples import example_onnx

    path = str(example_onnx("resnet50"))
    out = {"after": _spawn(path, 8)}
    if baseline:
        out["before"] = _spawn(path, 8, tree=baseline)
        out["after_again"] = _spawn(path, 8)  # interleaved: noise shows as spread
    return out


def run_order() -> dict:
    from defer.examples import example_onnx

    out = {}
    for name in ("inceptionv3", "densenet121"):
        path = str(example_onnx(name))
        out[name] = {f"n{n}": _spawn(path, n, profile=False, order="auto") for n in (4, 8)}
    return out


def render(results: dict) -> str:
    lines = []
    if "transformer" in results:
        r = results["transformer"]["n16"]
        lines.append(f"transformer ({r['n_ops']} ops) n=16: {r['wall_s']:.1f} s wall, "
                     f"{r['peak_rss_mb']:.0f} MB peak RSS, largest hop "
                     f"{max(r['hop_bytes']) / 1024:.0f} KiB")
    for key, r in results.get("resnet50", {}).items():
        lines.append(f"resnet50 n=8 {key:<12}: {r['wall_s']:.2f} s wall, "
                     f"{r['peak_rss_mb']:.0f} MB peak RSS")
    for name, by_n in results.get("order", {}).items():
        for n, r in by_n.items():
            cells = ", ".join(f"{order} {o['wire_bytes'] / 1e6:.2f} MB / {o['bottleneck'] * 1e3:.2f} ms"
                              for order, o in r["op_orders"].items())
            lines.append(f"{name} {n} wire / slowest stage by op order: {cells}; "
                         f"chosen: {r['op_order']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        model, n, profile, order = argv[1:5]
        print(json.dumps(child(model, int(n), profile == "1", None if order == "-" else order)))
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another checkout to compile ResNet50 with (before figures)")
    parser.add_argument("--layers", type=int, default=320, help="transformer layers (26 ops each)")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.json"))
    args = parser.parse_args(argv)
    results = run(args.only, args.layers, args.baseline)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(render(results))
    return 0


def run(only, layers: int = 320, baseline: Path | None = None) -> dict:
    results = {}
    with tempfile.TemporaryDirectory(prefix="defer-scale-") as tmp:
        if "transformer" in only:
            results["transformer"] = run_transformer(layers, Path(tmp))
        if "resnet50" in only:
            results["resnet50"] = run_resnet50(baseline)
        if "order" in only:
            results["order"] = run_order()
    return results


if __name__ == "__main__":
    sys.exit(main())
