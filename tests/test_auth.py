"""Authentication and TLS against real node processes: a node with a token refuses every message
type from a client that has no token, the wrong one, or a proof replayed from another
connection, and acts on none of them; the dispatcher and the node each refuse a peer that
cannot prove the token. With TLS on, a plain client is refused and a verified one is served
through a TLS data hop. Certificates are generated at test time (cryptography, else openssl).
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import socket
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner
from runtime_helpers import compile_tiny, reference, residual_mlp

from defer.cli import main
from defer.errors import AuthError, NodeError
from defer.local import start_node, stop_processes
from defer.runtime import auth
from defer.runtime import protocol as p
from defer.runtime.dispatcher import Dispatcher

TOKEN = "correct horse battery staple"


@pytest.fixture(scope="module")
def one_stage(tmp_path_factory):
    model = residual_mlp()
    return model, compile_tiny(model, tmp_path_factory.mktemp("auth"), n_stages=1)


@pytest.fixture(scope="module")
def guarded(one_stage):
    _, manifest = one_stage
    node = start_node(manifest.bundle_path(0), token=TOKEN)
    yield node
    stop_processes([node])


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 16)).astype(np.float32)


class _Raw:
    """A hand-driven client: send frames, read messages until the node closes."""

    def __init__(self, address: str):
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.decoder = p.Decoder()

    def send(self, *msgs) -> None:
        self.sock.sendall(b"".join(m if isinstance(m, bytes) else p.encode(m) for m in msgs))

    def next(self) -> p.Message | None:
        while (msg := self.decoder.next()) is None:
            data = self.sock.recv(65536)
            if not data:
                self.decoder.feed_eof()
                return self.decoder.next()
            self.decoder.feed(data)
        return msg

    def rest(self) -> list[p.Message]:
        out = []
        while (msg := self.next()) is not None:
            out.append(msg)
        return out

    def close(self) -> None:
        self.sock.close()


def _every_type(manifest) -> list[p.Message]:
    bundle = manifest.bundle_path(0).read_bytes()
    tensor = p.WireTensor(name="x", dtype="float32", shape=(1, 16), codec="raw",
                          data=_x().tobytes())
    return [
        p.Load(request_id=1, sha256=p_sha(bundle[:-1]), bundle=bundle[:-1]),
        p.Configure(request_id=2, stage=0, n_stages=1, next_hop="dispatcher",
                    receives=("x",), outputs=("y",)),
        p.Ack(request_id=3, what="load"),
        p.Infer(request_id=4, tensors=(tensor,)),
        p.Result(request_id=5, tensors=(tensor,)),
        p.Error(request_id=6, reason="x"),
        p.Stats(request_id=7),
        p.Ping(request_id=8),
        p.Pong(request_id=9),
        p.Shutdown(request_id=10, drain=False),
    ]


def p_sha(data: bytes) -> str:
    from defer.manifest import sha256_bytes

    return sha256_bytes(data)


def _attempts(role: str, msg: p.Message):
    """(name, function(raw client)) for each way to try `msg` without the token."""
    def first_frame(raw):  # no HELLO at all
        raw.send(msg)

    def no_proof(raw):  # HELLO without a challenge, as a token-less client would
        raw.send(p.Hello(role=role), msg)

    def wrong_token(raw):
        nonce = auth.new_nonce()
        raw.send(p.Hello(role=role, challenge=nonce))
        challenge = raw.next()
        assert isinstance(challenge, p.Hello) and challenge.challenge
        wrong = auth.proof("not the token", "client", role, nonce, challenge.challenge)
        raw.send(p.Hello(role=role, response=wrong), msg)

    def skip_proof(raw):  # answer the challenge with the message itself
        raw.send(p.Hello(role=role, challenge=auth.new_nonce()))
        raw.next()
        raw.send(msg)

    def replayed_proof(raw):  # a valid proof from another connection is worth nothing here
        nonce = auth.new_nonce()
        other = _Raw(raw.address)
        other.send(p.Hello(role=role, challenge=nonce))
        old = other.next().challenge
        other.close()
        raw.send(p.Hello(role=role, challenge=nonce))
        raw.next()
        raw.send(p.Hello(role=role, response=auth.proof(TOKEN, "client", role, nonce, old)),
                 msg)

    return [first_frame, no_proof, wrong_token, skip_proof, replayed_proof]


@pytest.mark.parametrize("role", ["dispatcher", "upstream"])
def test_every_message_type_is_refused_without_the_token(one_stage, guarded, role):
    model, manifest = one_stage
    cases = 0
    for msg in _every_type(manifest):
        for attempt in _attempts(role, msg):
            raw = _Raw(guarded.address)
            raw.address = guarded.address
            try:
                attempt(raw)
                replies = raw.rest()  # the node closes the connection
            finally:
                raw.close()
            # at most a refusal: never an ACK, STATS, PONG, RESULT or a per-request ERROR
            assert all(isinstance(r, p.Error) and r.request_id == 0 for r in replies), \
                (attempt.__name__, msg.TYPE.name, replies)
            cases += 1
    assert cases == 50
    assert guarded.process.poll() is None  # SHUTDOWN was not obeyed
    log = guarded.log_tail(2000)
    assert "authentication failed: wrong or missing token" in log
    assert "authentication required" in log and "expected HELLO" in log
    with Dispatcher(manifest, [guarded.address], token=TOKEN, timeout=10) as dispatcher:
        assert np.array_equal(dispatcher.infer(_x(1))["y"], reference(model, [{"x": _x(1)}])[0]["y"])
        stats = dispatcher.stats()["stages"][0]
    assert stats["requests"] == 1  # no INFER got through before this one


def test_the_dispatcher_needs_the_right_token(one_stage, guarded):
    _, manifest = one_stage
    with pytest.raises(AuthError, match="requires a token") as err:
        Dispatcher(manifest, [guarded.address], timeout=10)
    assert err.value.node == guarded.address
    with pytest.raises(AuthError, match="tokens differ"):
        Dispatcher(manifest, [guarded.address], token="guess", timeout=10)


def test_a_dispatcher_with_a_token_refuses_a_node_without_one(one_stage):
    _, manifest = one_stage
    open_node = start_node(manifest.bundle_path(0))
    try:
        with pytest.raises(AuthError, match="does not authenticate"):
            Dispatcher(manifest, [open_node.address], token=TOKEN, timeout=10)
    finally:
        stop_processes([open_node])


def _login(address: str, role: str, token: str) -> _Raw:
    raw = _Raw(address)
    nonce = auth.new_nonce()
    raw.send(p.Hello(role=role, challenge=nonce))
    challenge = raw.next()
    assert auth.check(token, "node", role, nonce, challenge.challenge, challenge.response)
    raw.send(p.Hello(role=role, response=auth.proof(token, "client", role, nonce,
                                                    challenge.challenge)))
    assert isinstance(raw.next(), p.Hello)
    return raw


def test_a_node_refuses_a_next_hop_with_another_token(one_stage, guarded):
    other = start_node(token="another")
    raw = _login(guarded.address, "dispatcher", TOKEN)
    try:
        raw.send(p.Configure(request_id=1, stage=0, n_stages=2, next_hop=other.address,
                             receives=("x",), outputs=("y",)))
        reply = raw.next()
        assert isinstance(reply, p.Error) and reply.request_id == 1
        assert "tokens differ" in reply.reason and other.address in reply.reason
    finally:
        raw.close()
        stop_processes([other])


def test_cli_reads_the_token_from_the_environment(one_stage, guarded):
    _, manifest = one_stage
    args = ["dispatch", "--manifest", str(manifest.path), "--nodes", guarded.address,
            "--count", "3"]
    ok = CliRunner().invoke(main, args, env={"DEFER_TOKEN": TOKEN})
    assert ok.exit_code == 0, ok.output
    wrong = CliRunner().invoke(main, args, env={"DEFER_TOKEN": "nope"})
    assert wrong.exit_code == 2 and "tokens differ" in wrong.output
    assert TOKEN not in " ".join(guarded.process.args)  # the secret is not on a command line
    help_text = CliRunner().invoke(main, ["serve", "--help"]).output
    assert "DEFER_TOKEN" in help_text and "--tls-cert" in help_text


def test_cli_reads_the_token_from_a_file(one_stage, guarded, tmp_path):
    _, manifest = one_stage
    (tmp_path / "token").write_text(TOKEN + "\n")
    args = ["dispatch", "--manifest", str(manifest.path), "--nodes", guarded.address,
            "--count", "3", "--token-file", str(tmp_path / "token")]
    ok = CliRunner().invoke(main, args, env={"DEFER_TOKEN": ""})
    assert ok.exit_code == 0, ok.output
    both = CliRunner().invoke(main, [*args, "--token", TOKEN])
    assert both.exit_code == 2 and "not both" in both.output


# --- TLS ---------------------------------------------------------------------------------------

def _self_signed(directory) -> tuple:
    cert, key = directory / "node.pem", directory / "node.key"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor openssl is available")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                        "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(cert)], check=True,
                       capture_output=True)
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(private.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, key


@pytest.fixture(scope="module")
def tls_chain(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    cert, key = _self_signed(directory)
    model = residual_mlp()
    manifest = compile_tiny(model, directory / "bundles", n_stages=2)
    nodes = []
    try:
        nodes += [start_node(manifest.bundle_path(i), token=TOKEN, tls_cert=cert, tls_key=key,
                             tls_ca=cert) for i in range(2)]
        yield model, manifest, nodes, cert
    finally:
        stop_processes(nodes)


def test_tls_chain_serves_a_verified_client(tls_chain):
    model, manifest, nodes, cert = tls_chain
    xs = [_x(i) for i in range(10)]
    with Dispatcher(manifest, [n.address for n in nodes], token=TOKEN, tls_ca=cert,
                    timeout=10) as dispatcher:
        got = [o["y"] for o in dispatcher.map(xs)]
    for out, want in zip(got, reference(model, [{"x": x} for x in xs])):
        assert np.array_equal(out, want["y"])
    assert "TLS, token required" in nodes[0].log_tail(200)


def test_tls_node_refuses_a_plain_client(tls_chain):
    _, manifest, nodes, _ = tls_chain
    with pytest.raises(NodeError, match="closed the connection during HELLO.*--tls-ca"):
        Dispatcher(manifest, [n.address for n in nodes], token=TOKEN, timeout=10)
    raw = _Raw(nodes[0].address)
    try:
        raw.send(p.Hello(role="dispatcher", challenge=auth.new_nonce()))
        assert raw.sock.recv(65536) == b""  # closed without one defer frame
    finally:
        raw.close()
    assert nodes[0].process.poll() is None


def test_a_tls_client_refuses_a_plain_node(one_stage, tls_chain, guarded):
    _, manifest = one_stage
    cert = tls_chain[3]
    with pytest.raises(NodeError, match="TLS handshake failed"):
        Dispatcher(manifest, [guarded.address], token=TOKEN, tls_ca=cert, timeout=10)


def test_token_file_is_read_and_clashes_are_refused(tmp_path):
    from defer.cli.common import resolve_token
    from defer.errors import UsageError

    path = tmp_path / "token"
    path.write_text("s3cret\n")
    assert resolve_token(None, path) == "s3cret" and resolve_token("t", None) == "t"
    with pytest.raises(UsageError, match="not both"):
        resolve_token("t", path)
    path.write_text("")
    with pytest.raises(UsageError, match="is empty"):
        resolve_token(None, path)
    with pytest.raises(UsageError, match="cannot read"):
        resolve_token(None, tmp_path / "missing")
