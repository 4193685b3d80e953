"""The Open Inference Protocol ("v2") without I/O: what both front ends share.

Bytes and parsed JSON go in, arrays and response bytes come out; no sockets, no framework.
- Datatypes: the protocol's names (FP32, INT64, BOOL...) to numpy's and back. BYTES and BF16
  have no place in a defer chain and are refused with a 400.
- Tensors: `tensor_from_data` (JSON "data", flat or nested, or the raw bytes of the binary
  extension and of gRPC's raw contents), checked against the declared shape and datatype.
- REST: `parse_rest_infer` reads a request body -- JSON, or the binary tensor data extension
  (header `Inference-Header-Content-Length` = size of the leading JSON; inputs with
  `parameters.binary_data_size` take that many bytes, in order, from what follows) -- and
  `rest_infer_response` writes one (outputs asked for with `binary_data`, or every output with
  the request parameter `binary_data_output`, go as bytes after the JSON).
- Errors: `error_status` maps an exception to the protocol's HTTP status and gRPC code, one
  table for both: 400/INVALID_ARGUMENT for a bad shape, dtype or body; 404/NOT_FOUND for an
  unknown model; 503/UNAVAILABLE when no chain is ready; 504/DEADLINE_EXCEEDED on a timeout.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from defer.errors import DeferError, DeferTimeoutError, InputError, NodeError, UsageError
from defer.tensors import TensorSpec

PROTOCOL_VERSION = "v2"
EXTENSIONS = ("binary_tensor_data",)
HEADER_LENGTH = "Inference-Header-Content-Length"

# numpy dtype name -> protocol datatype (every dtype a defer hop can carry)
DATATYPES: dict[str, str] = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64",
}
NUMPY_DTYPES: dict[str, str] = {v: k for k, v in DATATYPES.items()}


class ModelNotFoundError(UsageError):
    """A request names a model (or version) this gateway does not serve."""


class UnavailableError(NodeError):
    """No chain is ready to take a request (every chain failed or is closed)."""


# exception type -> (HTTP status, gRPC status code name, outcome label); the first match wins
ERROR_STATUS: tuple[tuple[type[BaseException], int, str, str], ...] = (
    (InputError, 400, "INVALID_ARGUMENT", "bad_request"),
    (ModelNotFoundError, 404, "NOT_FOUND", "not_found"),
    (UnavailableError, 503, "UNAVAILABLE", "unavailable"),
    (DeferTimeoutError, 504, "DEADLINE_EXCEEDED", "timeout"),
    (UsageError, 400, "INVALID_ARGUMENT", "bad_request"),
    (DeferError, 500, "INTERNAL", "error"),
)


def error_status(err: BaseException) -> tuple[int, str, str]:
    """(HTTP status, gRPC code name, outcome label) of an error; 500/INTERNAL if unknown."""
    for kind, http, grpc_code, outcome in ERROR_STATUS:
        if isinstance(err, kind):
            return http, grpc_code, outcome
    return 500, "INTERNAL", "error"


def datatype_of(dtype: str) -> str:
    return DATATYPES[dtype]


def numpy_dtype(datatype: str, name: str) -> np.dtype:
    """numpy dtype of a protocol datatype; InputError naming the tensor if defer cannot carry it."""
    dtype = NUMPY_DTYPES.get(str(datatype).upper())
    if dtype is None:
        raise InputError(f"tensor {name!r}: datatype {datatype!r} is not supported; use one of "
                         f"{sorted(NUMPY_DTYPES)}")
    return np.dtype(dtype)


def _shape(shape: Any, name: str) -> tuple[int, ...]:
    if not isinstance(shape, Sequence) or isinstance(shape, str | bytes) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InputError(f"tensor {name!r}: shape must be a list of integers >= 0, got {shape!r}")
    return tuple(shape)


def tensor_from_data(name: str, datatype: str, shape: Any, data: Any = None,
                     raw: bytes | None = None) -> np.ndarray:
    """One input tensor from JSON `data` (flat or nested) or `raw` row-major bytes."""
    dtype, shape = numpy_dtype(datatype, name), _shape(shape, name)
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InputError(f"tensor {name!r}: {len(raw)} bytes of data, but shape "
                             f"{list(shape)} of {datatype} takes {count * dtype.itemsize}")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    if data is None:
        raise InputError(f"tensor {name!r} has no data: give \"data\" (JSON) or "
                         "parameters.binary_data_size (binary tensor data extension)")
    try:
        array = np.asarray(data, dtype=dtype)
    except (TypeError, ValueError) as err:
        raise InputError(f"tensor {name!r}: data is not a (nested) list of {datatype} "
                         f"values: {err}") from None
    if array.size != count:
        raise InputError(f"tensor {name!r}: {array.size} values of data, but shape "
                         f"{list(shape)} holds {count}")
    return array.reshape(shape)


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    """The protocol's tensor metadata: a dynamic dimension is -1."""
    return {"name": spec.name, "datatype": datatype_of(spec.dtype),
            "shape": [d if isinstance(d, int) and d >= 0 else -1 for d in spec.shape]}


@dataclass
class ModelInfo:
    """What the gateway serves: one model (the manifest's), version "1"."""

    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    platform: str = "defer_onnx"
    version: str = "1"
    server_version: str = ""

    def check(self, name: str, version: str = "") -> None:
        if name != self.name or version not in ("", self.version):
            served = f"{self.name!r} (version {self.version})"
            raise ModelNotFoundError(f"unknown model {name!r}" + (f" version {version!r}"
                                     if version else "") + f"; this gateway serves {served}")

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "defer", "version": self.server_version, "extensions": list(EXTENSIONS)}

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "versions": [self.version], "platform": self.platform,
                "inputs": [tensor_metadata(s) for s in self.inputs],
                "outputs": [tensor_metadata(s) for s in self.outputs]}

    def output_names(self, requested: Sequence[str]) -> list[str]:
        """The requested outputs in request order (all, in model order, if none named)."""
        known = [s.name for s in self.outputs]
        unknown = [n for n in requested if n not in known]
        if unknown:
            raise InputError(f"unknown output(s) {unknown}; the model's outputs are {known}")
        return list(requested) or known


@dataclass
class InferRequest:
    """A parsed inference request: inputs by name, outputs wanted, and which go as bytes."""

    id: str
    inputs: dict[str, np.ndarray]
    outputs: list[str]
    binary: set[str] = field(default_factory=set)


def parse_rest_infer(body: bytes, header_length: int | None, model: ModelInfo) -> InferRequest:
    """Parse a REST infer body (JSON, or JSON + binary tensor data); InputError if malformed."""
    if header_length is not None and not 0 <= header_length <= len(body):
        raise InputError(f"{HEADER_LENGTH} is {header_length}, but the body has {len(body)} "
                         "bytes")
    split = len(body) if header_length is None else header_length
    try:
        request = json.loads(body[:split])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"the request body is not valid JSON: {err}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise InputError("the request must be a JSON object with an \"inputs\" list")
    binary, offset, inputs = memoryview(body)[split:], 0, {}
    for entry in request["inputs"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InputError("every input must be an object with a \"name\"")
        name, params = entry["name"], _params(entry, "input")
        size = params.get("binary_data_size")
        raw = None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InputError(f"input {name!r}: binary_data_size {size!r} overruns the "
                                 f"{len(binary)} bytes of binary data")
            raw, offset = bytes(binary[offset:offset + size]), offset + size
        if name in inputs:
            raise InputError(f"input {name!r} is given twice")
        inputs[name] = tensor_from_data(name, entry.get("datatype", ""), entry.get("shape"),
                                        entry.get("data"), raw)
    if offset != len(binary):
        raise InputError(f"{len(binary) - offset} bytes of binary data are not claimed by any "
                         "input's binary_data_size")
    wanted = request.get("outputs") or []
    if not isinstance(wanted, list) or not all(isinstance(o, dict) and "name" in o
                                               for o in wanted):
        raise InputError("\"outputs\" must be a list of objects with a \"name\"")
    outputs = model.output_names([o["name"] for o in wanted])
    every = bool(_params(request, "request").get("binary_data_output", False))
    chosen = {o["name"]: _params(o, "output").get("binary_data", every) for o in wanted}
    binary_names = {n for n in outputs if chosen.get(n, every)}
    return InferRequest(id=str(request.get("id", "")), inputs=inputs, outputs=outputs,
                        binary=binary_names)


def _params(entry: dict, what: str) -> dict[str, Any]:
    params = entry.get("parameters") or {}
    if not isinstance(params, dict):
        raise InputError(f"{what} parameters must be a JSON object")
    return params


def rest_infer_response(model: ModelInfo, request: InferRequest, outputs: dict[str, np.ndarray],
                        parameters: dict[str, Any] | None = None) -> tuple[bytes, int | None]:
    """(body, header length or None): JSON, then the bytes of outputs asked for as binary."""
    entries, blobs = [], []
    for name in request.outputs:
        array = np.ascontiguousarray(outputs[name])
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array.dtype.name),
                                 "shape": list(array.shape)}
        if name in request.binary:
            blob = array.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model.name, "model_version": model.version,
                                "outputs": entries}
    if request.id:
        response["id"] = request.id
    if parameters:
        response["parameters"] = parameters
    head = json.dumps(response, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)
