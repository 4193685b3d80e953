#!/bin/sh
# A chain of 2 node containers and a dispatcher container on this host (host network, bound
# to loopback), checked against the whole model in one onnxruntime session on the host.
#
#   deploy/image/chain-demo.sh [IMAGE]          default: localhost/defer-node:latest
#
# Needs podman, the node image (deploy/image/build-node.sh) and defer on the host (to build
# and compile a tiny seeded ONNX model and to compute the reference). PODMAN_RUN_ARGS goes to
# every `podman run` (e.g. "--runtime runc --ulimit nproc=4096:4096" in a sandbox, see
# build-node.sh). Exit 0 when the chain's outputs equal the whole model's.
set -eu
image=${1:-localhost/defer-node:latest}
work=$(mktemp -d /tmp/defer-chain.XXXXXX)
names="defer-demo-node-0 defer-demo-node-1"
cleanup() {
    for name in $names; do podman rm -f -t 5 "$name" >/dev/null 2>&1 || true; done
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

# 1. A tiny seeded model (onnx.helper), compiled into 2 stages, and 16 inputs.
python3 - "$work" <<'EOF'
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

work = Path(sys.argv[1])
rng = np.random.default_rng(0)
nodes, inits, x = [], [], "x"
for i in range(4):
    inits.append(numpy_helper.from_array((rng.standard_normal((32, 32)) * 0.3)
                                         .astype(np.float32), f"w{i}"))
    nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"mm{i}"),
              helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"),
              helper.make_node("Add", [f"r{i}", x], [f"s{i}"], name=f"add{i}")]
    x = f"s{i}"
graph = helper.make_graph(nodes, "demo", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                        [1, 32])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 32])], inits)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
onnx.save(model, str(work / "demo.onnx"))
np.savez(work / "x.npz", x=rng.standard_normal((16, 1, 32)).astype(np.float32))
EOF
python3 -m defer compile "$work/demo.onnx" -n 2 --no-profile -o "$work/bundles" >/dev/null
cp "$work/x.npz" "$work/bundles/"
mkdir "$work/out" && chown 10001:10001 "$work/out"
ports=$(python3 -c 'import socket
s = [socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1", 0)) for x in s]
print(" ".join(str(x.getsockname()[1]) for x in s))')
set -- $ports
printf 'DEFER_TOKEN=%s\n' "$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')" \
    > "$work/defer.env"
chmod 600 "$work/defer.env"

run() {
    # shellcheck disable=SC2086
    podman run ${PODMAN_RUN_ARGS:-} --network host --read-only --cap-drop ALL \
        --security-opt no-new-privileges --env-file "$work/defer.env" \
        -v "$work/bundles:/bundles:ro" "$@"
}

# 2. Two nodes, each serving its bundle; wait for their ready lines.
run -d --name defer-demo-node-0 "$image" /bundles/bundle_0.onnx --host 127.0.0.1 --port "$1"
run -d --name defer-demo-node-1 "$image" /bundles/bundle_1.onnx --host 127.0.0.1 --port "$2"
for name in $names; do
    tries=0
    until podman logs "$name" 2>/dev/null | grep -q "defer node listening on"; do
        tries=$((tries + 1))
        if [ "$tries" -gt 120 ]; then podman logs "$name"; echo "$name: not ready" >&2; exit 1; fi
        sleep 0.5
    done
done
echo "nodes ready on 127.0.0.1:$1 and 127.0.0.1:$2"

# 3. The dispatcher, in a container of the same image, streams the 16 inputs.
run --rm -v "$work/out:/out" --entrypoint defer "$image" dispatch \
    --manifest /bundles/manifest.json --nodes "127.0.0.1:$1,127.0.0.1:$2" \
    --input /bundles/x.npz --output /out/y.npz

# 4. The oracle: the whole model in one onnxruntime session on the host.
python3 - "$work" <<'EOF'
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

work = Path(sys.argv[1])
session = ort.InferenceSession(str(work / "demo.onnx"), providers=["CPUExecutionProvider"])
name = session.get_outputs()[0].name
xs = np.load(work / "x.npz")["x"]
expected = np.stack([session.run([name], {"x": x})[0] for x in xs])
got = np.load(work / "out" / "y.npz")[name]
error = float(np.max(np.abs(got - expected)))
print(f"chain of 2 containers vs whole model: {len(xs)} inferences, max abs error {error:.3g}")
sys.exit(0 if got.shape == expected.shape and error <= 1e-5 else 1)
EOF
