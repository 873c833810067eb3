"""The start-up check of the tracking store (``check_tracking``), before a stage does any work: a
server must answer and take this user's credentials, asked the way MLflow's runs will ask it; an
``mlflow.db`` must be an SQLite database that is not cut short (else one line naming the file, which
is left as it is); a ``file:`` store needs ``MLFLOW_ALLOW_FILE_STORE=true``, as MLflow 3 does.

MLflow is imported for a server only: a database or file store starts without it. A server's check
also reads JEM_TRACKING_WAIT (``pipeline.journal.wait_seconds``), so that a value that is not a number
stops the stage before its work rather than after it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.journal import wait_seconds
from pipeline.store import TrackingError, causes, tracking_root, tracking_uri

if TYPE_CHECKING:  # imported where used: the cheap stages start without them
    import requests
    from mlflow.utils.rest_utils import MlflowHostCreds


# The start-up check asks a server twice (its health, then one authenticated read), each once (no
# retries) and for at most this many seconds: a server that does not answer stops the stage quickly.
PROBE_TIMEOUT = 10
CREDENTIALS_FILE = "~/.mlflow/credentials"  # MLflow's own: an [mlflow] section, read where the variables are unset


def check_tracking(params: dict[str, Any]) -> None:
    """Stop with one line when the tracking store is not a tracking URI, or a server that does not
    answer or refuses this user (before any work). A server is asked the way the runs will ask it:
    through MLflow's own request path with MLflow's own host credentials (``MLFLOW_TRACKING_USERNAME``
    / ``_PASSWORD`` or ``~/.mlflow/credentials``, ``MLFLOW_TRACKING_TOKEN``, ``MLFLOW_TRACKING_AUTH``)
    and TLS settings (``MLFLOW_TRACKING_SERVER_CERT_PATH``, ``_CLIENT_CERT_PATH``, ``_INSECURE_TLS``),
    so a server that takes ``mlflow``'s requests takes the check's, and only those. MLflow is
    imported for a server only: a database or file store starts without it. The repository's
    ``mlflow.db`` (any ``sqlite:///`` file) is opened read-only and checked (``check_sqlite``); a
    ``file:`` store stops the stage unless ``MLFLOW_ALLOW_FILE_STORE`` is true, as MLflow 3 would later."""
    uri, source = tracking_uri(tracking_root(), params)
    scheme = uri.split(":", 1)[0]
    if scheme not in ("http", "https"):
        from jem.config.settings import TRACKING_SCHEMES

        if scheme not in TRACKING_SCHEMES:
            raise TrackingError(f"{source} = {uri!r}: not a tracking URI; expected http(s)://host:port of an "
                             "MLflow server, sqlite:///path, file:///path or a database URI")
        if scheme == "file" and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() not in ("true", "1"):
            raise TrackingError(f"{source} = {uri}: MLflow 3 logs to a file store only with "
                                "MLFLOW_ALLOW_FILE_STORE=true; log to sqlite:///<path>/mlflow.db instead (mlflow "
                                "migrate-filestore moves the runs there), or set MLFLOW_ALLOW_FILE_STORE=true")
        if scheme == "sqlite":
            check_sqlite(uri)
        return
    wait_seconds()  # a JEM_TRACKING_WAIT that is not a number stops the stage now, not after its work
    creds = _host_creds(uri, source)
    response = _probe(creds, "/health", source)
    if response.status_code != 200:
        raise TrackingError(_no_answer(source, uri, f"HTTP {response.status_code}"))
    check_credentials(uri, source, creds)


# SQLite's primary result codes for a file that is not a database or is damaged (cut short, overwritten);
# the others (busy, locked, read-only, no such table) are MLflow's to report or to mend.
SQLITE_DAMAGED = {11: "a damaged SQLite database (its disk image is malformed: cut short or overwritten?)",
                  26: "not an SQLite database"}


def check_sqlite(uri: str) -> None:
    """Stop with one line when the SQLite file of ``uri`` is there but not a sound database: its header,
    its schema and MLflow's schema version read, read-only (the file is left as it is; well under a
    millisecond whatever its size). ``PRAGMA quick_check``, which reads every page, would take about a
    millisecond per MB at every stage's start; damage further in is reported where the run opens."""
    import sqlite3

    rest = uri.split(":", 1)[1]
    path = Path(rest[3:].split("?", 1)[0]) if rest.startswith("///") else None
    if path is None or not path.name or path.name == ":memory:" or not path.is_file():
        return  # in memory, or not made yet: MLflow creates it
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=1)) as db:
            db.execute("PRAGMA schema_version").fetchone()
            if db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'alembic_version'").fetchone()[0]:
                db.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.DatabaseError as exc:
        if sqlite_damage(exc) is not None:
            raise TrackingError(damaged(path, exc)) from None


def sqlite_damage(exc: BaseException) -> str | None:
    """What SQLite says is wrong with the file, where ``exc`` (or what it wraps) says it is damaged."""
    import sqlite3

    for e in causes(exc):
        if isinstance(e, sqlite3.DatabaseError):
            code = getattr(e, "sqlite_errorcode", None)
            if code is not None and code & 0xFF in SQLITE_DAMAGED:
                return SQLITE_DAMAGED[code & 0xFF]
    return None


def damaged(path: Path, exc: BaseException) -> str:
    """The one line for the damaged SQLite file ``path`` (``exc`` said so): what is wrong and what to do."""
    return (f"{path}: {sqlite_damage(exc)}, so MLflow cannot open its runs; it was left as it is and the outputs "
            f"DVC tracks are untouched: move it aside (mv {path} {path}.corrupt), recover its runs if you need "
            f"them (sqlite3 {path}.corrupt .recover | sqlite3 {path}), and rerun")


def check_credentials(uri: str, source: str, creds: MlflowHostCreds | None = None) -> None:
    """One authenticated read (an experiments search) with MLflow's host credentials ``creds`` (read
    for ``uri`` where not given), so that a server behind authentication refusing them stops the stage
    in one line, naming whose they are and where they came from, before it computes or writes anything."""
    creds = creds if creds is not None else _host_creds(uri, source)
    response = _probe(creds, "/api/2.0/mlflow/experiments/search", source, params={"max_results": 1})
    code = response.status_code
    if code == 200:
        return
    who = _credentials_in_use(creds)
    if code == 401 and (creds.auth or creds.aws_sigv4):
        raise TrackingError(f"{source} = {uri}: the server refused {who} (HTTP 401); check that provider's settings, "
                            "or unset it to send MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    if code == 401:
        raise TrackingError(f"{source} = {uri}: the server refused {who} (HTTP 401); set MLFLOW_TRACKING_USERNAME "
                            "and MLFLOW_TRACKING_PASSWORD (or mlflow_tracking_username and mlflow_tracking_password "
                            f"under [mlflow] in {_credentials_file()}) to an account of its auth app")
    if code == 403:
        raise TrackingError(f"{source} = {uri}: the server knows {who} but does not let it read experiments "
                            "(HTTP 403); ask its admin for EDIT permission on the jem-<scale> experiments")
    raise TrackingError(f"{source} = {uri}: the server answered HTTP {code} to an experiments search; is it an "
                        "MLflow tracking server?")


def _credentials_file() -> Path:
    return Path(os.path.expanduser(CREDENTIALS_FILE))


def _host_creds(uri: str, source: str) -> MlflowHostCreds:
    """MLflow's host credentials for ``uri`` (``mlflow.utils.credentials.get_default_host_creds``, what
    its REST store uses), or one line naming the setting MLflow cannot use."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds

    try:
        creds = get_default_host_creds(uri)
    except (MlflowException, ValueError) as exc:  # e.g. INSECURE_TLS and SERVER_CERT_PATH both set, or not a bool
        message = " ".join(str(getattr(exc, "message", exc)).split())
        raise TrackingError(f"{source} = {uri}: MLflow cannot use its connection settings ({message}); "
                            "fix or unset the MLFLOW_TRACKING_* variable it names") from None
    for name, path in (("MLFLOW_TRACKING_SERVER_CERT_PATH", creds.server_cert_path),  # a CA bundle or folder
                       ("MLFLOW_TRACKING_CLIENT_CERT_PATH", creds.client_cert_path)):
        if path and not Path(path).exists():
            raise TrackingError(f"{name} = {path}: no such file; point it at a PEM file or unset it")
    return creds


def _probe(creds: MlflowHostCreds, endpoint: str, source: str, **request: Any) -> requests.Response:
    """GET ``endpoint`` of the server through MLflow's ``http_request`` (its headers, authentication and
    TLS settings), once, within PROBE_TIMEOUT; the response whatever its status, or one line when no
    answer comes (connection refused, timeout, TLS certificate not trusted)."""
    import warnings

    from mlflow.exceptions import MlflowException
    from mlflow.utils.rest_utils import http_request
    from urllib3.exceptions import InsecureRequestWarning

    try:
        with warnings.catch_warnings():  # MLFLOW_TRACKING_INSECURE_TLS asked for it: no warning in the one line
            warnings.simplefilter("ignore", InsecureRequestWarning)
            return http_request(creds, endpoint, "GET", max_retries=0, backoff_factor=0, backoff_jitter=0,
                                timeout=PROBE_TIMEOUT, raise_on_status=False, **request)
    except MlflowException as exc:
        raise TrackingError(_transport_error(exc, creds, source, api=endpoint != "/health")) from None


def _transport_error(exc: BaseException, creds: MlflowHostCreds, source: str, api: bool) -> str:
    """The one line for a request that got no answer: its innermost cause, and for a TLS certificate
    the server presents and this client does not trust, the variable that makes it trusted."""
    import ssl

    uri = creds.host
    chain = causes(exc)
    root = chain[-1]
    untrusted = next((e for e in chain if isinstance(e, ssl.SSLCertVerificationError)), None)
    if untrusted is not None:
        why = untrusted.verify_message or str(untrusted)
        if creds.server_cert_path:
            return (f"{source} = {uri}: the server's TLS certificate is not trusted by MLFLOW_TRACKING_SERVER_CERT_PATH"
                    f" = {creds.server_cert_path} ({why}); point it at the CA bundle that signed the certificate")
        return (f"{source} = {uri}: the server's TLS certificate is not trusted ({why}); set "
                "MLFLOW_TRACKING_SERVER_CERT_PATH to the CA bundle (.pem) that signed it, or "
                "MLFLOW_TRACKING_INSECURE_TLS=true to skip the check on a network you trust")
    if len(chain) == 1:  # MLflow refused to build the request (e.g. an unknown MLFLOW_TRACKING_AUTH provider)
        message = " ".join(str(getattr(exc, "message", exc)).split())
        return f"{source} = {uri}: MLflow cannot make its request ({message}); fix its MLFLOW_TRACKING_* settings"
    reason = " ".join(str(root).split()) or type(root).__name__
    if api:
        return f"{source} = {uri}: the MLflow tracking server does not answer its API ({reason})"
    return _no_answer(source, uri, reason)


def _no_answer(source: str, uri: str, reason: str) -> str:
    return (f"{source} = {uri}: the MLflow tracking server does not answer ({reason}); start it "
            "(mlflow server --host 0.0.0.0 --port 5000 ...) or unset it to log to mlflow.db")


def _credentials_in_use(creds: MlflowHostCreds) -> str:
    """Whose credentials MLflow sends with ``creds`` (as its ``http_request`` picks them), and where they
    came from: its variables, or the credentials file for what they leave unset."""
    if creds.auth:
        return f"the {creds.auth!r} auth provider of MLFLOW_TRACKING_AUTH"
    if creds.aws_sigv4:
        return "an AWS SigV4 signature (MLFLOW_TRACKING_AWS_SIGV4)"
    in_env = {name: bool(os.environ.get(f"MLFLOW_TRACKING_{name.upper()}")) for name in ("username", "password")}
    where = {name: f"MLFLOW_TRACKING_{name.upper()}" if env else f"mlflow_tracking_{name} in {_credentials_file()}"
             for name, env in in_env.items()}
    if creds.username and creds.password:
        if all(in_env.values()):
            return f"user {creds.username!r} (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)"
        if not any(in_env.values()):
            return f"user {creds.username!r} (from {_credentials_file()})"
        return f"user {creds.username!r} ({where['username']}, password from {where['password']})"
    if creds.token:
        return "the token in MLFLOW_TRACKING_TOKEN"
    if creds.username:
        return f"no credentials (user {creds.username!r} from {where['username']} has no password)"
    return "no credentials"
