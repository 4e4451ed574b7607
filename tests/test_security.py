"""TLS, mutual TLS and bearer tokens. The certificates are made here, for this test only."""

from __future__ import annotations

import datetime
import logging
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from camserve import CamserveError, Client

from conftest import TINY, running, wait_for

PLAIN = np.full((32, 32, 3), 100, np.uint8)


def _certificates(tmp_path):
    """A throwaway CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(subject, key, issuer, issuer_key, ca=False, san=None):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def name(common):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write(stem, cert, key):
        (tmp_path / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp_path / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue(name("camserve test CA"), ca_key, name("camserve test CA"), ca_key, ca=True)
    write("ca", ca, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    write("server", issue(name("localhost"), server_key, ca.subject, ca_key, san=[
        x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        server_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    write("client", issue(name("a client"), client_key, ca.subject, ca_key), client_key)
    return tmp_path


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return _certificates(tmp_path_factory.mktemp("certs"))


def test_tls(certs):
    with running(model=TINY, tls_cert=str(certs / "server.pem"),
                 tls_key=str(certs / "server.key")) as (server, _):
        target = f"localhost:{server.port}"
        with Client(target, root_certificates=str(certs / "ca.pem"), timeout=20) as client:
            assert client.predict(PLAIN).top
        with Client(target, timeout=5) as plaintext:
            with pytest.raises(CamserveError) as error:
                plaintext.predict(PLAIN)
            assert error.value.code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_client_without_a_certificate(certs):
    with running(model=TINY, tls_cert=str(certs / "server.pem"),
                 tls_key=str(certs / "server.key"),
                 tls_client_ca=str(certs / "ca.pem")) as (server, _):
        target = f"localhost:{server.port}"
        with Client(target, root_certificates=str(certs / "ca.pem"),
                    client_cert=str(certs / "client.pem"), client_key=str(certs / "client.key"),
                    timeout=20) as client:
            assert client.predict(PLAIN).top
        with Client(target, root_certificates=str(certs / "ca.pem"), timeout=5) as anonymous:
            with pytest.raises(CamserveError) as error:
                anonymous.predict(PLAIN)
            assert error.value.code == grpc.StatusCode.UNAVAILABLE


def test_token_auth(caplog):
    token = "s3cret-token-value"
    caplog.set_level(logging.DEBUG)
    with running(model=TINY, auth_tokens=("other", token)) as (server, _):
        target = f"127.0.0.1:{server.port}"
        with Client(target, token=token) as client:
            assert client.predict(PLAIN).top and client.model_info().labels
        for wrong in (None, "nope", token + "x"):
            with Client(target, token=wrong) as client:
                with pytest.raises(CamserveError) as error:
                    client.predict(PLAIN)
                assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
                assert "Bearer" in error.value.details
                assert error.value.reason == "UNAUTHENTICATED"
        with grpc.insecure_channel(target) as channel:  # health needs no token
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        assert token not in repr(server.settings)
        denied = server.metrics.value("camserve_requests_total", rpc="Predict",
                                      code="UNAUTHENTICATED")
        assert denied == 3
    assert token not in caplog.text
    assert "UNAUTHENTICATED" not in caplog.text or token not in caplog.text


def test_the_token_is_checked_before_the_message_is_decompressed():
    """A gzip-compressed Predict that decompresses to 40 MB (over the message limit): without
    a token it is refused UNAUTHENTICATED from its headers, never decompressed (gRPC would
    answer RESOURCE_EXHAUSTED "Decompressed message larger than max"); with one, gRPC's
    limit answers. Denied calls of every kind are counted."""
    from camserve.v1 import camserve_pb2 as pb
    from camserve.v1 import camserve_pb2_grpc as pb_grpc

    zeros = bytes(40_000_000)
    request = pb.PredictRequest(images=[pb.Image(raw=pb.RawImage(
        pixels=zeros, height=1, width=len(zeros) // 3, channels=3))])
    with running(model=TINY, auth_tokens=("s3cret",)) as (server, _):
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.CamserveServiceStub(channel)
            for metadata, code in ((None, grpc.StatusCode.UNAUTHENTICATED),
                                   ((("authorization", "Bearer s3cret"),),
                                    grpc.StatusCode.RESOURCE_EXHAUSTED)):
                with pytest.raises(grpc.RpcError) as caught:
                    stub.Predict(request, timeout=30, metadata=metadata,
                                 compression=grpc.Compression.Gzip)
                assert caught.value.code() == code, caught.value.details()
            frames = stub.StreamPredict(iter([pb.StreamPredictRequest()]), timeout=30)
            with pytest.raises(grpc.RpcError) as caught:
                list(frames)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert server.metrics.value("camserve_requests_total", rpc="Predict",
                                    code="UNAUTHENTICATED") == 1
        assert server.metrics.value("camserve_requests_total", rpc="StreamPredict",
                                    code="UNAUTHENTICATED") == 1


def test_token_flags_and_file(tmp_path):
    from camserve_server.process.settings import parse_settings

    tokens = tmp_path / "tokens"
    tokens.write_text("alpha\n\nbeta\n")
    settings = parse_settings(["--auth-token", "gamma", "--auth-token-file", str(tokens)],
                              environ={})
    assert settings.auth_tokens == ("gamma", "alpha", "beta")
    assert "alpha" not in repr(settings)


def test_cli_token_and_tls_options(certs):
    import subprocess
    import sys
    from pathlib import Path

    cli = str(Path(sys.executable).parent / "camserve")
    with running(model=TINY, auth_tokens=("cli-token",), tls_cert=str(certs / "server.pem"),
                 tls_key=str(certs / "server.key")) as (server, _):
        base = [cli, "--target", f"localhost:{server.port}", "--ca-cert", str(certs / "ca.pem")]
        done = subprocess.run(base + ["--token", "cli-token", "info"], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "python:tiny_models:tiny_cnn" in done.stdout
        done = subprocess.run(base + ["info"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and "UNAUTHENTICATED" in done.stderr


def _get(url: str, token=None, context=None):
    """(status, body) of an HTTP GET; errors answer their status too."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_metrics_serve_only_metrics_and_follow_tls_and_tokens(certs):
    """/metrics listens where gRPC does (127.0.0.1 by default), answers no other path, and is
    as protected as the gRPC port: HTTPS with --tls-cert, a Bearer token with --auth-token."""
    import ssl

    with running(model=TINY, metrics_port=0) as (server, _):
        base = f"http://127.0.0.1:{server.metrics_port}"
        assert server.metrics_endpoint.host == "127.0.0.1"
        status, body = _get(base + "/metrics")
        assert status == 200 and "camserve_state" in body
        assert _get(base + "/metrics?name[]=camserve_state")[0] == 200
        for path in ("/", "/debug", "/metrics/x", "/../etc/passwd"):
            assert _get(base + path)[0] == 404, path
    token = "scrape-token-value"
    with running(model=TINY, metrics_port=0, auth_tokens=(token,),
                 tls_cert=str(certs / "server.pem"),
                 tls_key=str(certs / "server.key")) as (server, _):
        https = f"https://localhost:{server.metrics_port}/metrics"
        trusted = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        status, body = _get(https, token, trusted)
        assert status == 200 and "camserve_requests_total" in body
        assert _get(https, None, trusted)[0] == 401
        assert _get(https, "wrong", trusted)[0] == 401
        with pytest.raises(OSError):  # plaintext HTTP is not answered
            _get(f"http://localhost:{server.metrics_port}/metrics", token)


FLOOD = """
import sys, time, grpc
from camserve.v1 import camserve_pb2 as pb, camserve_pb2_grpc as pb_grpc
channel = grpc.insecure_channel(sys.argv[1], options=[("grpc.use_local_subchannel_pool", 1)])
stub, request = pb_grpc.CamserveServiceStub(channel), pb.PredictRequest()
ends = time.monotonic() + float(sys.argv[2])
while time.monotonic() < ends:
    for call in [stub.Predict.future(request, timeout=30) for _ in range(2000)]:
        call.cancel()
"""


def test_a_flood_of_calls_opened_and_cancelled_cancels_no_one_else():
    """HTTP/2 rapid reset from 3 other connections (3 processes): gRPC core cancels calls at
    random once more than its pending limit wait for the application; an innocent caller's
    calls must all be answered."""
    import subprocess
    import sys

    with running(model=TINY) as (server, client):
        floods = [subprocess.Popen([sys.executable, "-c", FLOOD, f"127.0.0.1:{server.port}",
                                    "6"]) for _ in range(3)]
        codes = []
        try:
            while any(flood.poll() is None for flood in floods):
                try:
                    client.predict(PLAIN, timeout=60)
                    codes.append("OK")
                except CamserveError as exc:
                    codes.append(exc.code.name)
        finally:
            for flood in floods:
                flood.kill()
                flood.wait()
        assert codes and set(codes) == {"OK"}, codes


def test_a_connection_holds_at_most_max_calls_per_connection():
    """--max-calls-per-connection 2: a third stream on the same connection waits in the
    client, never reaching the server, until one of the first two ends."""
    import threading

    from camserve.v1 import camserve_pb2 as pb
    from camserve.v1 import camserve_pb2_grpc as pb_grpc

    with running(model=TINY, max_calls_per_connection=2) as (server, _):
        release = [threading.Event() for _ in range(3)]

        def requests(event):
            yield pb.StreamPredictRequest(config=pb.StreamPredictConfig())
            event.wait(60)

        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.CamserveServiceStub(channel)
            streams = [stub.StreamPredict(requests(e), timeout=60) for e in release]
            open_now = lambda: server.metrics.value("camserve_streams_open")  # noqa: E731
            wait_for(lambda: open_now() == 2, 30, "two streams open")
            for _ in range(10):  # and the third does not come meanwhile
                assert open_now() == 2
                time.sleep(0.1)
            release[0].set()
            wait_for(lambda: open_now() == 2 and streams[0].code() is not None, 30,
                     "the third stream in the first one's place")
            for event in release:
                event.set()
            for stream in streams:
                list(stream)
