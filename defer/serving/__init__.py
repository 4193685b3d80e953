"""The gateway: a long-running Open Inference Protocol service in front of one or more chains.

`defer gateway` owns one `Dispatcher` per chain (a replica of the whole pipeline) and serves
the Open Inference Protocol ("v2", spoken by Triton, KServe, MLServer, OpenVINO Model Server)
over HTTP/REST (FastAPI + uvicorn) and gRPC (grpcio, the protocol's published .proto), with
Prometheus metrics on a third port. Modules:

    oip.py       the protocol without I/O: datatypes, JSON and binary tensors, metadata, errors
    pool.py      the chains: routing, replay of a failed chain's requests, probing (the guarantee)
    batching.py  dynamic batching of concurrent requests (bundles with a dynamic batch dim)
    metrics.py   the gateway's Prometheus metrics        trace.py  Chrome trace-event JSON
    rest.py      the HTTP/REST front end                 grpc_api.py  the gRPC front end
    server.py    GatewayConfig and run_gateway: every server in one asyncio loop
    ready.py     the ready line `defer gateway` prints (defer.local.start_gateway waits for it)

Needs the `[serve]` extra; an edge node never installs it.
"""
