"""The start-up check of a tracking server (``pipeline.probe.check_tracking``) asks it the way MLflow
does: with MLflow's own credentials (its variables, else ``~/.mlflow/credentials``) and TLS settings,
through its own request path. Here against a small basic-auth stand-in on 127.0.0.1 (``/health`` and
the experiments search), plain and TLS with a certificate made in the test, in-process: no
``mlflow server``. Also what the MLflow layer leaves to MLflow (parameter batches) and the one
private MLflow name it uses (the artifact repository registry), checked by name."""

from __future__ import annotations

import base64
import datetime
import http.server
import inspect
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pipeline.probe import check_tracking
from pipeline.store import TrackingError
from pipeline.tracking import StageRun

ACCOUNT = ("lab-member", "correct horse battery staple")
MLFLOW_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                    "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_AUTH", "MLFLOW_TRACKING_AWS_SIGV4",
                    "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH",
                    "MLFLOW_TRACKING_CLIENT_CERT_PATH", "DVC_ROOT")


class _BasicAuthServer(http.server.BaseHTTPRequestHandler):
    """``/health`` for anyone; the experiments search for ACCOUNT only (HTTP 401 otherwise)."""

    expected = "Basic " + base64.b64encode(":".join(ACCOUNT).encode()).decode()

    def do_GET(self) -> None:
        if self.path.split("?")[0] == "/health":
            code, body = 200, b"OK"
        elif self.path.startswith("/api/2.0/mlflow/experiments/search?"):
            authorized = self.headers.get("Authorization") == self.expected
            code, body = (200, b'{"experiments": []}') if authorized else (401, b"You are not authenticated.")
        else:
            code, body = 404, b"{}"
        self.send_response(code)
        if code == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def _server(tls: tuple[Path, Path] | None = None) -> Iterator[str]:
    """The stand-in on a free loopback port (``tls``: its certificate and key); yields its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BasicAuthServer)
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)  # a refused handshake: dropped
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that signs itself (so it is its own CA bundle), and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jem test tracking server")])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "server.pem", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A HOME of this test's own (no ~/.mlflow/credentials yet) and no MLflow variables."""
    for name in MLFLOW_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def _credentials_file(home: Path, user: str, password: str) -> Path:
    path = home / ".mlflow" / "credentials"
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"[mlflow]\nmlflow_tracking_username = {user}\nmlflow_tracking_password = {password}\n")
    return path


def _refusal(params: dict[str, Any]) -> str:
    with pytest.raises(TrackingError) as refused:
        check_tracking(params)
    line = str(refused.value)
    assert "\n" not in line, line
    return line


def test_credentials_from_the_mlflow_credentials_file_or_the_environment(home: Path,
                                                                         monkeypatch: pytest.MonkeyPatch):
    with _server() as url:
        params = {"run": {"tracking_uri": url}}
        line = _refusal(params)  # nothing anywhere
        assert line.startswith(f"run.tracking_uri = {url}: the server refused no credentials (HTTP 401); set "
                               "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"), line
        assert str(home / ".mlflow" / "credentials") in line

        path = _credentials_file(home, *ACCOUNT)  # the file only, as `mlflow` itself reads it
        check_tracking(params)
        _credentials_file(home, ACCOUNT[0], "guess")
        line = _refusal(params)
        assert line.startswith(f"run.tracking_uri = {url}: the server refused user '{ACCOUNT[0]}' (from {path}) "
                               "(HTTP 401)"), line

        path.unlink()  # the environment only
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ACCOUNT[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ACCOUNT[1])
        check_tracking({})
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "guess")
        line = _refusal({})
        assert line.startswith(f"MLFLOW_TRACKING_URI = {url}: the server refused user '{ACCOUNT[0]}' "
                               "(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) (HTTP 401)"), line

        path = _credentials_file(home, "someone-else", ACCOUNT[1])  # the variables win, the file fills in
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        check_tracking({})
        _credentials_file(home, "someone-else", "guess")
        assert f"refused user '{ACCOUNT[0]}' (MLFLOW_TRACKING_USERNAME, password from mlflow_tracking_password " \
               f"in {path}) (HTTP 401)" in _refusal({})


def test_a_self_signed_tls_server_needs_its_certificate_or_insecure_tls(home: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    cert, key = _self_signed(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ACCOUNT[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ACCOUNT[1])
    with _server((cert, key)) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        line = _refusal({})
        assert line.startswith(f"MLFLOW_TRACKING_URI = {url}: the server's TLS certificate is not trusted ("), line
        assert "set MLFLOW_TRACKING_SERVER_CERT_PATH" in line and "MLFLOW_TRACKING_INSECURE_TLS=true" in line

        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(cert))
        check_tracking({})
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(tmp_path / "missing.pem"))
        assert _refusal({}).startswith(f"MLFLOW_TRACKING_SERVER_CERT_PATH = {tmp_path / 'missing.pem'}: no such file")

        monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
        monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
        check_tracking({})
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(cert))  # both: MLflow refuses, so do we
        line = _refusal({})
        assert line.startswith(f"MLFLOW_TRACKING_URI = {url}: MLflow cannot use its connection settings ("), line
        assert "MLFLOW_TRACKING_INSECURE_TLS" in line


def test_a_server_that_does_not_answer_is_one_line_before_any_credentials(home: Path):
    with _server() as url:
        pass  # stopped: nothing listens there any more
    line = _refusal({"run": {"tracking_uri": url}})
    assert line.startswith(f"run.tracking_uri = {url}: the MLflow tracking server does not answer ("), line
    assert "Connection refused" in line and "mlflow server --host" in line


class _RecordingClient:
    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []

    def log_batch(self, run_id: str, **batch: Any) -> None:
        self.batches.append(batch)


def test_params_go_to_mlflow_in_one_call_which_splits_them_into_batches(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch):
    """StageRun hands MLflow all parameters at once; MLflow's client splits them for the store (which
    takes 100 a request): checked against a file store (no schema to create), which refuses more."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

    recording = _RecordingClient()
    params = {"group": {f"p{i}": i for i in range(250)}, "listed": [1, 2]}
    StageRun(recording, "run-id").log_params(params)
    assert len(recording.batches) == 1 and len(recording.batches[0]["params"]) == 251

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    run_id = client.create_run(client.create_experiment("batches")).info.run_id
    StageRun(client, run_id).log_params(params)
    logged = client.get_run(run_id).data.params
    assert len(logged) == 251 and logged["group.p249"] == "249" and logged["listed"] == "[1, 2]"


def test_the_private_mlflow_registry_we_use_is_still_there():
    """``_serve_proxied_artifacts_locally`` registers its ``mlflow-artifacts`` repository through MLflow's
    private registry (no public call exists); an MLflow upgrade that moves it fails here, by name."""
    import importlib

    import mlflow

    used = (("mlflow.store.artifact.artifact_repository_registry", "_artifact_repository_registry"),
            ("mlflow.store.artifact.local_artifact_repo", "LocalArtifactRepository"),
            ("mlflow.store.artifact.mlflow_artifacts_repo", "MlflowArtifactsRepository"))
    found: dict[str, Any] = {}
    for module, name in used:
        try:
            found[name] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise AssertionError(f"MLflow {mlflow.__version__} has no {module}.{name} any more ({exc}); update "
                                 "pipeline.tracking._serve_proxied_artifacts_locally") from exc
    where = f"MLflow {mlflow.__version__}: {used[0][0]}._artifact_repository_registry"
    register = getattr(found["_artifact_repository_registry"], "register", None)
    assert callable(register), f"{where} has no register(); update pipeline.tracking._serve_proxied_artifacts_locally"
    try:
        inspect.signature(register).bind("mlflow-artifacts", lambda *a, **k: None)
    except TypeError as exc:
        raise AssertionError(f"{where}.register no longer takes (scheme, factory): {inspect.signature(register)}; "
                             "update pipeline.tracking._serve_proxied_artifacts_locally") from exc

    calls: list[tuple[Any, ...]] = []  # and calls the factory as ours expects: (uri, tracking_uri=, registry_uri=)
    fresh = type(found["_artifact_repository_registry"])()
    fresh.register("jemtest", lambda uri, tracking_uri=None, registry_uri=None: calls.append(
        (uri, tracking_uri, registry_uri)) or "repository")
    assert fresh.get_artifact_repository("jemtest:/a/b", tracking_uri="sqlite:///x.db") == "repository"
    assert calls == [("jemtest:/a/b", "sqlite:///x.db", None)], (f"{where} calls a registered factory "
                                                                  f"differently ({calls}); update pipeline.tracking")
