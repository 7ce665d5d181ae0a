"""Is the MLflow tracking store there? Checked before any stage starts, so a store that is down
fails a command in seconds instead of after MLflow's retries (about four minutes).

    http(s)://host           GET <uri>/health answers 200 (MLflow's health endpoint)
    postgresql://, mysql://  the SQLAlchemy driver imports and a connection opens
    sqlite:///path           the database's folder exists (SQLite creates the file)
    file:/path, a path       the store's parent folder exists (MLflow creates the store)

Every check ends within about `timeout_s` whatever the other end does (a server that accepts
and never answers, a host name that never resolves): it runs in a daemon thread that is left
behind when time is up. Messages name the store with its credentials masked (`mask_uri`).
"""

from __future__ import annotations

import base64
import http.client
import os
import re
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from rlhf_core.tracking.experiment import tracking_uri

CHECK_TIMEOUT_S = 5.0
SERVER_SCHEMES = ("http", "https")
# Databricks stores authenticate through their own profiles: not checked here.
UNCHECKED_SCHEMES = ("databricks", "databricks-uc", "uc")
# What to install when a SQLAlchemy driver (its DBAPI module) is missing.
DRIVER_INSTALL = {
    "psycopg2": "pip install 'rlhf-pipeline[server]'",
    "psycopg": "pip install 'psycopg[binary]'",
    "pymysql": "pip install PyMySQL",
    "MySQLdb": "pip install mysqlclient",
    "pyodbc": "pip install pyodbc",
    "pymssql": "pip install pymssql",
}
_SECRET_QUERY_VALUE = re.compile(r"((?:password|passwd|pwd|secret|token)[^=&]*=)[^&]*", re.I)


class TrackingStoreError(RuntimeError):
    """The tracking store cannot be used; the message is one line with credentials masked."""


def check_tracking_store(project_root: str | Path = ".", timeout_s: float = CHECK_TIMEOUT_S) -> str:
    """Check the project's tracking store (`tracking_uri`) and return its URI; raise
    TrackingStoreError within about `timeout_s` when it cannot be reached."""
    root = Path(project_root).resolve()
    uri = tracking_uri(root)
    check_store_uri(uri, root, timeout_s)
    return uri


def check_store_uri(uri: str, base: str | Path = ".", timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Check one tracking URI (see the module docstring); relative sqlite and file paths are
    read from `base`, the folder the pipeline's stages run in."""
    scheme = store_scheme(uri)
    if scheme in UNCHECKED_SCHEMES:
        return
    if scheme in SERVER_SCHEMES:
        check = _check_server
    elif scheme == "sqlite":
        check = _check_sqlite
    elif scheme in ("", "file"):
        check = _check_file_store
    else:
        check = _check_database
    _within(timeout_s + 1.0, uri, lambda: check(uri, Path(base), timeout_s))


def store_scheme(uri: str) -> str:
    """The URI's scheme without its driver ("postgresql+psycopg2://" -> "postgresql"); "" for
    a plain path."""
    if "://" not in uri and not uri.startswith(("file:", "databricks", "uc")):
        return ""
    return uri.split(":", 1)[0].split("+", 1)[0].lower()


def mask_uri(uri: str) -> str:
    """The URI with its credentials replaced by `***`: the password (for a server, the whole
    user part, which may be a token) and query values such as `password=`."""
    parts = urlsplit(uri)
    masked = uri
    if "@" in parts.netloc:
        userinfo, _, host = parts.netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        if parts.scheme.lower() in SERVER_SCHEMES:
            shown = "***"
        else:
            shown = f"{user}:***" if colon else user
        masked = masked.replace(parts.netloc, f"{shown}@{host}", 1)
    if parts.query:
        head, _, query = masked.partition("?")
        masked = f"{head}?{_SECRET_QUERY_VALUE.sub(_mask_value, query)}"
    return masked


def _mask_value(match: re.Match) -> str:
    return f"{match.group(1)}***"


def without_credentials(uri: str) -> str:
    """An http(s) URI without its user part: the address to show or open in a browser."""
    parts = urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _within(limit_s: float, uri: str, check: Callable[[], None]) -> None:
    """Run `check` in a daemon thread; its error, or TrackingStoreError after `limit_s`."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            check()
        except BaseException as error:  # handed to the caller's thread, raised there
            outcome.append(error)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, name="tracking-store-check", daemon=True)
    thread.start()
    thread.join(limit_s)
    if not outcome:
        raise TrackingStoreError(
            f"The tracking store {mask_uri(uri)} did not answer within {limit_s:g} s; "
            "check that it is up, or fix MLFLOW_TRACKING_URI."
        )
    if outcome[0] is not None:
        raise outcome[0]


def _or_fix_the_uri() -> str:
    """', or fix MLFLOW_TRACKING_URI' when the URI came from there (not the project's own)."""
    return ", or fix MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else ""


# --------------------------------------------------------------------------------------------
# An MLflow tracking server
# --------------------------------------------------------------------------------------------


def _check_server(uri: str, _base: Path, timeout_s: float) -> None:
    """GET <uri>/health answers 200 within `timeout_s` (per connect and per read)."""
    parts = urlsplit(uri)
    health = without_credentials(urlunsplit(parts._replace(query="", fragment="")))
    request = urllib.request.Request(
        f"{health.rstrip('/')}/health", headers=_auth_headers(parts.netloc)
    )
    shown = mask_uri(uri)
    try:
        context = _ssl_context() if parts.scheme.lower() == "https" else None
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as reply:
            status = reply.status
    except urllib.error.HTTPError as error:
        status = error.code
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        raise TrackingStoreError(
            f"The MLflow tracking server {shown} does not answer ({_reason(error, timeout_s)}); "
            "start it, or fix MLFLOW_TRACKING_URI."
        ) from None
    if status != 200:
        raise TrackingStoreError(
            f"The MLflow tracking server {shown} answered HTTP {status} at /health; is it an "
            f"MLflow tracking server, and are its credentials set (MLFLOW_TRACKING_TOKEN, "
            f"MLFLOW_TRACKING_USERNAME/PASSWORD)?"
        )


def _auth_headers(netloc: str) -> dict[str, str]:
    """The credentials MLflow's client would send: MLFLOW_TRACKING_TOKEN, else
    MLFLOW_TRACKING_USERNAME/PASSWORD, else a user:password@ in the URI."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    if not user and "@" in netloc:
        user, _, password = netloc.rpartition("@")[0].partition(":")
        user, password = unquote(user), unquote(password)
    if not user:
        return {}
    basic = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return {"Authorization": f"Basic {basic}"}


def _ssl_context() -> ssl.SSLContext:
    """TLS as MLflow's client does it: MLFLOW_TRACKING_INSECURE_TLS, _SERVER_CERT_PATH and
    _CLIENT_CERT_PATH are honoured."""
    context = ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"))
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    client_cert = os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH")
    if client_cert:
        context.load_cert_chain(client_cert)
    return context


def _reason(error: BaseException, timeout_s: float) -> str:
    """A few words for a connection error: 'connection refused', 'no answer within 5 s'."""
    reason = getattr(error, "reason", error)
    if isinstance(reason, TimeoutError) or "timed out" in str(reason):
        return f"no answer within {timeout_s:g} s"
    text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
    return text[0].lower() + text[1:]


# --------------------------------------------------------------------------------------------
# Local stores: SQLite and the (deprecated) file store
# --------------------------------------------------------------------------------------------


def _check_sqlite(uri: str, base: Path, _timeout_s: float) -> None:
    """The folder of the database file exists (in-memory databases always pass)."""
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    _require_folder(uri, (base / database).parent)


def _check_file_store(uri: str, base: Path, _timeout_s: float) -> None:
    """The parent of a file store's folder exists."""
    path = urlsplit(uri).path if uri.startswith("file:") else uri
    _require_folder(uri, (base / unquote(path)).parent)


def _require_folder(uri: str, folder: Path) -> None:
    if not folder.is_dir():
        raise TrackingStoreError(
            f"The tracking store {mask_uri(uri)} is in {folder}, which does not exist; create "
            f"it{_or_fix_the_uri()}."
        )


# --------------------------------------------------------------------------------------------
# A database server (PostgreSQL, MySQL, ...) through SQLAlchemy, as MLflow reaches it
# --------------------------------------------------------------------------------------------


def _check_database(uri: str, _base: Path, timeout_s: float) -> None:
    """The dialect's driver imports and a connection opens within `timeout_s`."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
    from sqlalchemy.pool import NullPool

    shown = mask_uri(uri)
    try:
        url = make_url(uri)
        dialect = url.get_dialect()
    except (ArgumentError, NoSuchModuleError) as error:
        raise TrackingStoreError(
            f"The tracking store {shown} is not a database URI SQLAlchemy knows ({error})."
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError as error:
        module = getattr(error, "name", None) or url.get_driver_name()
        install = DRIVER_INSTALL.get(module, f"pip install {module}")
        raise TrackingStoreError(
            f"{url.get_backend_name()}:// needs the {module} driver, which is not installed: "
            f"{install} (tracking store {shown})."
        ) from None
    engine = create_engine(url, poolclass=NullPool, connect_args=_connect_timeout(url, timeout_s))
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as error:
        raise TrackingStoreError(
            f"Cannot connect to the tracking database {shown}: {_database_reason(error, url)}; "
            "check that the database server is up and MLFLOW_TRACKING_URI is right."
        ) from None
    finally:
        engine.dispose()


def _connect_timeout(url, timeout_s: float) -> dict[str, int]:
    """The driver's own connect timeout where its name is known (libpq and the MySQL drivers);
    other drivers rely on the thread's deadline."""
    if url.get_backend_name() in ("postgresql", "mysql", "mariadb"):
        return {"connect_timeout": max(1, round(timeout_s))}
    return {}


def _database_reason(error: BaseException, url) -> str:
    """The driver's first line of error, without the password should a driver echo it."""
    original = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(original).splitlines() if line.strip()]
    reason = (lines or [type(original).__name__])[0].rstrip(".")
    if url.password:
        reason = reason.replace(str(url.password), "***")
    return reason
