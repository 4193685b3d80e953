"""TFLite in the compiler: read, analyse, cut, time and convert `.tflite` models.

    graph = read_tflite("model.tflite")          # UsageError for what defer cannot cut
    graph.ops, graph.crossing(k), graph.crossing_bytes(k), graph.specs
    graph.slice(a, b) -> bytes                    # a self-contained .tflite of ops [a, b)
    graph.time_ops() -> seconds per op            # one-op models under LiteRT, real inputs
    graph.estimate_costs() -> seconds per op      # FLOPs + bytes, without running anything

Reading, slicing and timing need only LiteRT (the `[tflite]` extra). `to_tflite` (Keras or
SavedModel -> .tflite, optionally fp16/int8) and `tflite_to_onnx` need TensorFlow (`[keras]`)
and import it only when called.
"""

from defer.compiler.tflite.convert import tflite_to_onnx, to_tflite
from defer.compiler.tflite.graph import TFLiteGraph, TFLiteOp
from defer.compiler.tflite.read import read_tflite

__all__ = ["TFLiteGraph", "TFLiteOp", "read_tflite", "tflite_to_onnx", "to_tflite"]
