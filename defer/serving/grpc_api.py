"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService` on grpc.aio.

Messages and the service come from the protocol's published .proto (defer/serving/proto).
ModelInfer takes inputs as `raw_input_contents` (what tritonclient sends) or as typed
`contents`, and answers with `raw_output_contents`. Errors abort the call with the status code
of `oip.error_status`: INVALID_ARGUMENT for a bad shape or dtype, NOT_FOUND for an unknown
model, UNAVAILABLE when no chain is ready, DEADLINE_EXCEEDED on a timeout.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
import numpy as np

from defer.errors import DeferError, InputError
from defer.serving.oip import datatype_of, error_status, tensor_from_data
from defer.serving.proto import open_inference_grpc_pb2 as pb
from defer.serving.proto import open_inference_grpc_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024

# protocol datatype -> the InferTensorContents field that carries it (FP16 goes raw only)
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
}


def parse_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """The request's input tensors, from raw contents or typed contents; InputError if bad."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InputError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; "
                         "give one per input, in order, or none")
    inputs = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in inputs:
            raise InputError(f"input {tensor.name!r} is given twice")
        if raw:
            inputs[tensor.name] = tensor_from_data(tensor.name, tensor.datatype,
                                                   list(tensor.shape), raw=raw[i])
            continue
        field = CONTENTS_FIELD.get(tensor.datatype.upper())
        if field is None:
            raise InputError(f"input {tensor.name!r}: datatype {tensor.datatype!r} must come "
                             "in raw_input_contents")
        inputs[tensor.name] = tensor_from_data(tensor.name, tensor.datatype,
                                               list(tensor.shape),
                                               data=list(getattr(tensor.contents, field)))
    return inputs


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The servicer; `gateway` is a server.Gateway (model info, readiness, infer)."""

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway
        self.model = gateway.model

    async def _abort(self, context: grpc.aio.ServicerContext, err: DeferError) -> None:
        await context.abort(getattr(grpc.StatusCode, error_status(err)[1]), str(err))

    async def ServerLive(self, request, context):  # noqa: N802 - the protocol's names
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=self.gateway.ready)

    async def ModelReady(self, request, context):  # noqa: N802
        try:
            self.model.check(request.name, request.version)
        except DeferError as err:
            await self._abort(context, err)
        return pb.ModelReadyResponse(ready=self.gateway.ready)

    async def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(**self.model.server_metadata())

    async def ModelMetadata(self, request, context):  # noqa: N802
        try:
            self.model.check(request.name, request.version)
        except DeferError as err:
            await self._abort(context, err)
        meta = self.model.metadata()
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]])

    async def ModelInfer(self, request, context):  # noqa: N802
        try:
            async with self.gateway.answering("grpc"):
                self.model.check(request.model_name, request.model_version)
                inputs = parse_inputs(request)
                names = self.model.output_names([o.name for o in request.outputs])
                outputs, answer = await self.gateway.infer(inputs)
                response = pb.ModelInferResponse(model_name=self.model.name,
                                                 model_version=self.model.version,
                                                 id=request.id)
                response.parameters["defer_chain"].int64_param = answer.chain
                for name in names:
                    array = np.ascontiguousarray(outputs[name])
                    response.outputs.add(name=name, datatype=datatype_of(array.dtype.name),
                                         shape=list(array.shape))
                    response.raw_output_contents.append(array.tobytes())
                return response
        except DeferError as err:
            await self._abort(context, err)
        except Exception as err:  # a bug: say so in the protocol's terms, log the traceback
            log.exception("internal error answering ModelInfer")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {err!r}")


def create_server(gateway: Any, address: str) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server (not started) bound to `address` ("host:port"); the bound port."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=options)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(gateway), server)
    port = server.add_insecure_port(address)
    return server, port
