"""TFLite in the compiler: read, analyse, cut, time and convert `.tflite` models.

    graph = read_tflite("model.tflite")            # UsageError for what defer cannot cut
    info = analyse(graph, batch=1, order="file")   # a GraphInfo, as for ONNX (graph.py)
    bundle, spec = stage_bundle(info, a, b, i)     # a self-contained .tflite of ops [a, b)
    times = time_ops(info); times.costs(info)      # one-op models under LiteRT, real inputs
    estimate_costs(info)                           # FLOPs + bytes, without running anything

The compiler's recipe reaches these through `defer.compiler.frontend`. Reading, slicing and
timing need only LiteRT (the `[tflite]` extra). `to_tflite` (Keras or SavedModel -> .tflite,
optionally fp16/int8) and `tflite_to_onnx` need TensorFlow (`[keras]`) and import it only when
called.
"""

from defer.compiler.tflite.convert import load_tflite, tflite_to_onnx, to_tflite
from defer.compiler.tflite.costs import OpTimes, estimate_costs, time_ops
from defer.compiler.tflite.graph import TFLiteGraph, analyse
from defer.compiler.tflite.read import read_tflite
from defer.compiler.tflite.slicer import slice_operators, stage_bundle

__all__ = ["OpTimes", "TFLiteGraph", "analyse", "estimate_costs", "load_tflite", "read_tflite",
           "slice_operators", "stage_bundle", "time_ops", "tflite_to_onnx", "to_tflite"]
