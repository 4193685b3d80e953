"""The Open Inference Protocol without I/O (defer/serving/oip.py) and the batcher, in-process:
request bodies (JSON flat and nested, the binary tensor data extension) parse into the right
arrays or raise InputError and nothing else; responses are read back by tritonclient's own
parser; the error table maps to the protocol's statuses; batches split back exactly."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from defer.errors import DeferTimeoutError, InputError, NodeError
from defer.serving.batching import Batcher
from defer.serving.oip import (
    HEADER_LENGTH,
    ModelInfo,
    ModelNotFoundError,
    UnavailableError,
    error_status,
    parse_rest_infer,
    rest_infer_response,
    tensor_from_data,
)
from defer.serving.pool import Answer
from defer.tensors import TensorSpec

tritonhttp = pytest.importorskip("tritonclient.http")

MODEL = ModelInfo("m", [TensorSpec("a", "float32", ("N", 3)), TensorSpec("b", "int64", (2,))],
                  [TensorSpec("y", "float32", ("N", 3)), TensorSpec("n", "int64", (2,))])
A = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
B = np.array([5, -3], dtype=np.int64)


def _binary_body(inputs: list[tuple[str, str, np.ndarray]], **request) -> tuple[bytes, int]:
    blobs = [a.tobytes() for _, _, a in inputs]
    head = json.dumps({**request, "inputs": [
        {"name": n, "datatype": t, "shape": list(a.shape),
         "parameters": {"binary_data_size": len(blob)}}
        for (n, t, a), blob in zip(inputs, blobs)]}).encode()
    return head + b"".join(blobs), len(head)


def test_json_flat_and_nested_and_binary_parse_the_same():
    flat = json.dumps({"inputs": [
        {"name": "a", "datatype": "FP32", "shape": [2, 3], "data": A.ravel().tolist()},
        {"name": "b", "datatype": "INT64", "shape": [2], "data": B.tolist()}]}).encode()
    nested = flat.replace(json.dumps(A.ravel().tolist()).encode(),
                          json.dumps(A.tolist()).encode())
    binary, length = _binary_body([("a", "FP32", A), ("b", "INT64", B)])
    for body, header in ((flat, None), (nested, None), (binary, length)):
        request = parse_rest_infer(body, header, MODEL)
        assert np.array_equal(request.inputs["a"], A) and request.inputs["a"].dtype == A.dtype
        assert np.array_equal(request.inputs["b"], B)
        assert request.outputs == ["y", "n"] and request.binary == set()


@pytest.mark.parametrize("body, header, message", [
    (b"{not json", None, "not valid JSON"),
    (b"[]", None, "\"inputs\" list"),
    (b'{"inputs": [{"name": "a", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}', None,
     "not supported"),
    (b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [2], "data": [1]}]}', None,
     "1 values"),
    (b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [-1], "data": []}]}', None,
     "integers >= 0"),
    (b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1]}]}', None, "no data"),
    (b'{"inputs": [], "outputs": [{"name": "z"}]}', None, "unknown output"),
    (b'{"inputs": []}', b"xx", "not claimed"),
    (b'{"inputs": []}', 99, HEADER_LENGTH),
    (b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [2], '
     b'"parameters": {"binary_data_size": 8}}]}', b"abcd", "overruns"),
])
def test_malformed_requests_raise_input_error(body, header, message):
    if isinstance(header, bytes):  # the binary part after a JSON header of len(body)
        body, header = body + header, len(body)
    with pytest.raises(InputError, match=message):
        parse_rest_infer(body, header, MODEL)


def test_raw_bytes_must_match_the_shape():
    with pytest.raises(InputError, match="12 bytes"):
        tensor_from_data("a", "FP32", [2, 2], raw=b"\0" * 12)
    assert tensor_from_data("a", "BOOL", [2], data=[True, False]).dtype == np.bool_


@pytest.mark.parametrize("binary_output", [False, True])
def test_responses_read_back_by_tritonclient(binary_output):
    body = json.dumps({"id": "7", "inputs": [], "parameters": {
        "binary_data_output": binary_output}, "outputs": [{"name": "n"}, {"name": "y"}]})
    request = parse_rest_infer(body.encode(), None, MODEL)
    content, header = rest_infer_response(MODEL, request, {"y": A, "n": B}, {"defer_chain": 1})
    assert (header is not None) == binary_output
    result = tritonhttp.InferResult.from_response_body(content, header_length=header)
    assert np.array_equal(result.as_numpy("y"), A) and np.array_equal(result.as_numpy("n"), B)
    response = result.get_response()
    assert response["id"] == "7" and response["parameters"] == {"defer_chain": 1}
    assert [o["name"] for o in response["outputs"]] == ["n", "y"]


def test_metadata_and_model_check():
    meta = MODEL.metadata()
    assert meta["inputs"] == [{"name": "a", "datatype": "FP32", "shape": [-1, 3]},
                              {"name": "b", "datatype": "INT64", "shape": [2]}]
    MODEL.check("m", "1")
    with pytest.raises(ModelNotFoundError, match="serves 'm'"):
        MODEL.check("m", "2")


def test_error_table():
    assert error_status(InputError("x")) == (400, "INVALID_ARGUMENT", "bad_request")
    assert error_status(ModelNotFoundError("x"))[:2] == (404, "NOT_FOUND")
    assert error_status(UnavailableError("x"))[:2] == (503, "UNAVAILABLE")
    assert error_status(DeferTimeoutError("x"))[:2] == (504, "DEADLINE_EXCEEDED")
    assert error_status(NodeError("x"))[:2] == (500, "INTERNAL")
    assert error_status(RuntimeError("x"))[:2] == (500, "INTERNAL")


def test_batcher_groups_by_shape_and_splits_rows_back():
    batches = []

    async def run(inputs):
        batches.append(inputs["a"].shape[0])
        return Answer({"y": inputs["a"] * 2}, chain=0, attempts=1)

    async def main():
        async with asyncio.TaskGroup() as tasks:
            batcher = Batcher(run, max_batch=4, max_delay=0.05, spawn=tasks.create_task)
            inputs = [np.full((1 + i % 2, 3), i, np.float32) for i in range(6)]
            inputs.append(np.full((1, 5), 9, np.float32))  # another shape: its own batch
            inputs.append(np.full((4, 3), 8, np.float32))  # a full batch alone
            return inputs, await asyncio.gather(*(batcher.infer({"a": x}) for x in inputs))

    inputs, results = asyncio.run(main())
    for x, (outputs, answer) in zip(inputs, results):
        assert np.array_equal(outputs["y"], x * 2) and answer.chain == 0
    # rows 1+2+1 = 4 (full) | 2+1, then 2 would overflow: 3 | 2 (delay) | [1, 5] alone | 4 alone
    assert sorted(batches) == [1, 2, 3, 4, 4]
