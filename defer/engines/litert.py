"""The LiteRT engine: one `ai_edge_litert` Interpreter (XNNPACK on, `threads` threads) behind
the `Engine` interface, for `.tflite` bundles.

Tensors are named by the model's signature (`serving_default`, or its only signature), not by
the flatbuffer's tensor names, which are long fused names and not unique: a defer bundle's
signature names its crossing tensors. A model without signatures falls back to its subgraph's
tensor names. A quantized tensor's spec carries `quant=(scale, zero_point)`. A dynamic dimension
(-1 in the shape signature) is None in the spec; a feed of another size resizes the tensors.

Importing this module imports LiteRT only: neither TensorFlow nor onnxruntime.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from defer.errors import InputError, ManifestError
from defer.tensors import TensorSpec

SIGNATURE = "serving_default"


def _spec(name: str, details: dict[str, Any]) -> TensorSpec:
    signature = details.get("shape_signature")
    dims = signature if signature is not None and len(signature) else details["shape"]
    shape = tuple(int(d) if d >= 0 else None for d in dims)
    scales = details.get("quantization_parameters", {}).get("scales", ())
    scale, zero_point = details.get("quantization", (0.0, 0))
    quant = (float(scale), int(zero_point)) if scale and len(scales) == 1 else None
    return TensorSpec(name, np.dtype(details["dtype"]).name, shape, quant)


class LiteRTEngine:
    """One LiteRT interpreter behind the `Engine` interface."""

    format = "tflite"

    def __init__(self, model: bytes | bytearray | memoryview | str | Path, threads: int = 1):
        content = Path(model).read_bytes() if isinstance(model, str | Path) else bytes(model)
        try:
            self.interpreter = Interpreter(model_content=content, num_threads=threads)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as err:
            reason = " ".join(str(err).split())
            raise ManifestError(f"LiteRT cannot load the bundle: {reason}") from None
        inputs, outputs = self._named_details()
        self.inputs = [_spec(name, d) for name, d in inputs.items()]
        self.outputs = [_spec(name, d) for name, d in outputs.items()]
        self._input_index = {name: int(d["index"]) for name, d in inputs.items()}
        self._output_index = {name: int(d["index"]) for name, d in outputs.items()}
        self._shapes = {name: tuple(int(x) for x in d["shape"]) for name, d in inputs.items()}

    def _named_details(self) -> tuple[dict[str, dict], dict[str, dict]]:
        """name -> tensor details of the inputs and outputs, in signature order."""
        signatures = self.interpreter.get_signature_list()
        if signatures:
            key = SIGNATURE if SIGNATURE in signatures else next(iter(signatures))
            runner = self.interpreter.get_signature_runner(key)
            ins, outs = runner.get_input_details(), runner.get_output_details()
            return ({n: ins[n] for n in signatures[key]["inputs"]},
                    {n: outs[n] for n in signatures[key]["outputs"]})
        return ({d["name"]: d for d in self.interpreter.get_input_details()},
                {d["name"]: d for d in self.interpreter.get_output_details()})

    def run(self, outputs: Sequence[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        self._resize(feeds)
        interpreter = self.interpreter
        for name, array in feeds.items():
            index = self._input_index.get(name)
            if index is None:
                raise InputError(f"the bundle has no input {name!r}; it takes "
                                 f"{list(self._input_index)}")
            interpreter.set_tensor(index, array)
        interpreter.invoke()
        try:
            return [interpreter.get_tensor(self._output_index[name]) for name in outputs]
        except KeyError as err:
            raise InputError(f"the bundle has no output {err.args[0]!r}; it gives "
                             f"{list(self._output_index)}") from None

    def _resize(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Resize inputs whose dynamic dimensions changed size, then reallocate once."""
        changed = False
        for name, array in feeds.items():
            shape = tuple(np.shape(array))
            if name in self._shapes and shape != self._shapes[name]:
                self.interpreter.resize_tensor_input(self._input_index[name], list(shape),
                                                     strict=True)
                self._shapes[name] = shape
                changed = True
        if changed:
            self.interpreter.allocate_tensors()
