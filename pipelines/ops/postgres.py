"""A private PostgreSQL cluster for the stack (Debian's `postgresql` binaries), or the user's own.

The cluster lives under `$MMFUSION_HOME/stack/postgres/`, listens on 127.0.0.1 only (no Unix
socket: its path could be too long, and nobody else needs it), and asks for a password
(scram-sha-256) that is kept in a file only its owner can read. As root, PostgreSQL refuses to
run, so the cluster is owned by and runs as the `postgres` user that Debian's package creates.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

DATABASES = ("prefect", "mlflow")
SUPERUSER = "mmfusion"
FIX = "install Debian's PostgreSQL (`apt-get install postgresql`) or pass --postgres URL (a server of your own)"


class PostgresError(RuntimeError):
    pass


def binary(name: str) -> str:
    """`initdb` / `postgres`: on PATH, else in Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if not found:
        candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
        found = str(candidates[-1]) if candidates else None
    if not found:
        raise PostgresError(f"PostgreSQL's `{name}` was not found on PATH nor in /usr/lib/postgresql: {FIX}")
    return found


def run_as() -> str | None:
    """The user the server runs as: `postgres` when we are root (PostgreSQL refuses root), else us."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError as e:
        raise PostgresError(f"running as root needs the `postgres` user to own the database: {FIX}") from e
    return "postgres"


def init_cluster(data_dir: Path, password: str) -> None:
    """`initdb` a new cluster in `data_dir` (once; an initialised one is kept)."""
    if (data_dir / "PG_VERSION").exists():
        return
    user = run_as()
    data_dir.mkdir(parents=True, exist_ok=True)
    pwfile = data_dir.parent / f".pgpass-init-{secrets.token_hex(4)}"
    pwfile.write_text(password + "\n")
    try:
        if user:
            shutil.chown(data_dir, user, user)
            shutil.chown(pwfile, user, user)
            _check_reachable(data_dir, user)
        argv = [binary("initdb"), "-D", str(data_dir), "-U", SUPERUSER, f"--pwfile={pwfile}",
                "--auth=scram-sha-256", "-E", "UTF8", "--locale=C"]
        done = subprocess.run(argv, user=user, capture_output=True, text=True, timeout=300)
    finally:
        pwfile.unlink(missing_ok=True)
    if done.returncode != 0:
        raise PostgresError(f"initdb {data_dir} failed:\n{done.stdout}{done.stderr}")
    os.chmod(data_dir, 0o700)


def _check_reachable(data_dir: Path, user: str) -> None:
    probe = subprocess.run(["test", "-w", str(data_dir)], user=user, timeout=30)
    if probe.returncode != 0:
        raise PostgresError(
            f"the `{user}` user cannot reach {data_dir} (a parent directory is private): set "
            f"MMFUSION_HOME to a directory every user may traverse (chmod o+x on its parents), or pass "
            "--postgres URL"
        )


def server_argv(data_dir: Path, port: int) -> list[str]:
    return [binary("postgres"), "-D", str(data_dir), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
            "-c", "unix_socket_directories=", "-c", "max_connections=200"]


def local_url(port: int, password: str, database: str = "postgres") -> str:
    return f"postgresql://{SUPERUSER}:{quote(password, safe='')}@127.0.0.1:{port}/{database}"


def with_database(url: str, database: str, driver: str | None = None) -> str:
    """`url` pointing at `database` (and the SQLAlchemy driver, e.g. `asyncpg`, when given)."""
    parts = urlsplit(url)
    scheme = "postgresql" + (f"+{driver}" if driver else "")
    return urlunsplit((scheme, parts.netloc, f"/{database}", parts.query, ""))


def ready(url: str) -> bool:
    import psycopg2

    with psycopg2.connect(with_database(url, "postgres"), connect_timeout=3):
        return True


def ensure_databases(url: str) -> None:
    """Create the `prefect` and `mlflow` databases on the server at `url` when missing."""
    import psycopg2

    conn = psycopg2.connect(with_database(url, "postgres"), connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            for name in DATABASES:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
