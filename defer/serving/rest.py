"""The Open Inference Protocol over HTTP/REST: a FastAPI app over the gateway (served by uvicorn).

    GET  /v2/health/live                             200 {"live": true}
    GET  /v2/health/ready                            200 {"ready": true}, 503 while no chain is
    GET  /v2                                         server metadata
    GET  /v2/models/{name}[/versions/{v}]            model metadata (inputs/outputs: manifest's)
    GET  /v2/models/{name}[/versions/{v}]/ready      200 / 503 {"name", "ready"}
    POST /v2/models/{name}[/versions/{v}]/infer      JSON, or the binary tensor data extension

Every error is the protocol's `{"error": "..."}` with the status of `oip.error_status` (also
for unknown paths). A body with `Content-Encoding: gzip` or `deflate` is inflated first.
"""

from __future__ import annotations

import gzip
import logging
import zlib
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from defer.errors import DeferError, InputError
from defer.serving.oip import HEADER_LENGTH, error_status, parse_rest_infer, rest_infer_response

log = logging.getLogger(__name__)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(gateway: Any) -> FastAPI:
    """The REST app; `gateway` is a server.Gateway (model info, readiness, infer)."""
    model = gateway.model
    app = FastAPI(title="defer gateway", version=model.server_version, docs_url=None,
                  redoc_url=None, openapi_url=None)

    @app.exception_handler(DeferError)
    async def defer_error(request: Request, err: DeferError) -> JSONResponse:
        return _error(error_status(err)[0], str(err))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("internal error answering %s %s", request.method, request.url.path)
        return _error(500, f"internal error: {err!r}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(err.status_code, f"{err.detail}: {request.method} {request.url.path}")

    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        ok = gateway.ready
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2")
    async def server_metadata() -> dict:
        return model.server_metadata()

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str = "") -> dict:
        model.check(name, version)
        return model.metadata()

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str = "") -> JSONResponse:
        model.check(name, version)
        ok = gateway.ready
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str = "") -> Response:
        async with gateway.answering("http"):
            model.check(name, version)
            body = _inflate(await request.body(), request.headers.get("content-encoding"))
            parsed = parse_rest_infer(body, _header_length(request), model)
            outputs, answer = await gateway.infer(parsed.inputs)
            content, header_length = rest_infer_response(
                model, parsed, outputs, {"defer_chain": answer.chain})
        if header_length is None:
            return Response(content, media_type="application/json")
        return Response(content, media_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(header_length)})

    return app


def _header_length(request: Request) -> int | None:
    value = request.headers.get(HEADER_LENGTH)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{HEADER_LENGTH} must be an integer, got {value!r}") from None


def _inflate(body: bytes, encoding: str | None) -> bytes:
    try:
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body)
    except (OSError, zlib.error, EOFError) as err:
        raise InputError(f"cannot inflate the {encoding} request body: {err}") from None
    if encoding not in (None, "identity"):
        raise InputError(f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
    return body
