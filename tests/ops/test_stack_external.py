"""`mmfusion stack up --postgres URL --artifacts s3://...`: a user's own PostgreSQL and an
S3-compatible artifact store, both real and both started here, outside the stack.

The user's server is a second PostgreSQL cluster (Debian's binaries, as the `postgres` user when
we are root) on a port of its own; the object store is moto's S3 server on 127.0.0.1. The tests
check that Prefect and MLflow keep their data in that server, that a registered model's files
land in the bucket, and that `down` stops the stack but leaves the user's database running.
The tests run in file order; the last one takes the stack down.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipelines.ops import postgres, procs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
from registry_support import LINEAGE, hits, make_checkpoint, make_report  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BUCKET, PREFIX = "mmf-artifacts", "mlflow"
SERVICES = ["ray-head", "ray-worker", "mlflow", "prefect-server", "prefect-worker"]  # no postgres of its own


def _mmfusion(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mmfusion"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _users_postgres(root: Path) -> tuple[int, str]:
    """Someone's own PostgreSQL: a cluster of its own, on its own port; (pid, URL) once it answers."""
    password, port, data = secrets.token_urlsafe(16), procs.free_port(), root / "users-postgres"
    postgres.init_cluster(data, password)
    log = root / "users-postgres.log"
    pid = procs.spawn(postgres.server_argv(data, port), dict(os.environ), log, user=postgres.run_as())
    url = postgres.local_url(port, password)
    up = procs.wait_until(lambda: _answers(url) or not procs.alive(pid), 120)
    assert up and procs.alive(pid), f"the user's PostgreSQL did not start; its log:\n{procs.log_tail(log)}"
    return pid, url


def _answers(url: str) -> bool:
    try:
        return postgres.ready(url)
    except Exception:  # psycopg2.OperationalError while it starts
        return False


def _query(url: str, database: str, sql: str) -> list[tuple]:
    import psycopg2

    with psycopg2.connect(postgres.with_database(url, database), connect_timeout=10) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


@pytest.fixture(scope="module")
def stack(s3_server):
    """The user's PostgreSQL and a bucket, then `mmfusion stack up` on both (the command's
    result is checked by the first test)."""
    import boto3

    root = Path(tempfile.mkdtemp(prefix="mmf-stack-ext-"))
    os.chmod(root, 0o755)  # as root, PostgreSQL runs as `postgres`, which must reach its data dir
    pg_pid, pg_url = _users_postgres(root)
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=BUCKET)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN", "PREFECT_HOME")}
    env.update(MMFUSION_HOME=str(root / "home"), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               OMP_NUM_THREADS="1", MLFLOW_S3_ENDPOINT_URL=s3_server)  # the AWS_* keys: from `s3_server`
    ctx = {"env": env, "home": root / "home", "pg_pid": pg_pid, "pg_url": pg_url, "s3": s3_server}
    try:
        ctx["up"] = _mmfusion("stack", "up", "--postgres", pg_url, "--artifacts", f"s3://{BUCKET}/{PREFIX}",
                              env=env, timeout=900)
        yield ctx
    finally:
        _mmfusion("stack", "down", env=env)
        procs.terminate(pg_pid, sig=2)  # SIGINT: PostgreSQL's fast shutdown
        shutil.rmtree(root, ignore_errors=True)


def test_up_keeps_prefect_and_mlflow_in_the_users_postgres(stack):
    up = stack["up"]
    assert up.returncode == 0, up.stderr[-4000:]
    assert "postgres" not in [line.split()[0] for line in up.stderr.splitlines() if "starting" in line]
    assert not (stack["home"] / "stack" / "postgres").exists()  # no cluster of the stack's own
    status = _mmfusion("stack", "status", env=stack["env"])
    assert [line.split()[:2] for line in status.stdout.splitlines()] == [[s, "healthy"] for s in SERVICES]
    url = stack["pg_url"]
    # the worker registered its work pool with the Prefect server, which wrote it to the user's server
    assert ("mmfusion",) in _query(url, "prefect", "SELECT name FROM work_pool")
    assert ("Default",) in _query(url, "mlflow", "SELECT name FROM experiments")


def test_a_registered_models_files_land_in_the_bucket(stack, tmp_path):
    import boto3

    from pipelines.config import load_config
    from pipelines.registry import register_and_gate, resolve_model

    server = next(line.split("=", 1)[1] for line in stack["up"].stdout.splitlines()
                  if line.startswith("export MLFLOW_TRACKING_URI="))
    cfg = load_config("debug", [f"services.home={tmp_path / 'home'}", f"services.mlflow_tracking_uri={server}",
                                "eval.bootstrap_samples=200"])
    ckpt = make_checkpoint(tmp_path, 1)
    result = register_and_gate(cfg, ckpt, make_report(tmp_path, hits(40)), LINEAGE)
    assert result["promoted"]
    keys = [o["Key"] for page in boto3.client("s3", endpoint_url=stack["s3"]).get_paginator("list_objects_v2")
            .paginate(Bucket=BUCKET, Prefix=f"{PREFIX}/") for o in page.get("Contents", [])]
    weights = [k for k in keys if k.endswith("/checkpoint/model.safetensors")]
    assert len(weights) == 1, keys
    body = boto3.client("s3", endpoint_url=stack["s3"]).get_object(Bucket=BUCKET, Key=weights[0])["Body"].read()
    assert body == (ckpt / "model.safetensors").read_bytes()
    assert not (stack["home"] / "stack" / "mlflow-artifacts").exists()  # not the local default
    # the version is in the user's database, and comes back through the server from the bucket
    versions = _query(stack["pg_url"], "mlflow", "SELECT name, version FROM model_versions")
    assert (cfg.registry.model_name, int(result["version"])) in versions
    local = resolve_model(cfg, f"models:/{cfg.registry.model_name}@champion")
    assert (local / "model.safetensors").read_bytes() == body


def test_down_stops_the_stack_and_leaves_the_users_postgres_running(stack):
    import json

    state = json.loads((stack["home"] / "stack" / "state.json").read_text())
    ours = {pid for entry in state["pids"].values() for pid in procs.session_members(entry["pid"])}
    assert stack["pg_pid"] not in ours
    down = _mmfusion("stack", "down", env=stack["env"])
    assert down.returncode == 0, down.stderr
    assert [p for p in ours if procs.alive(p)] == []
    assert procs.alive(stack["pg_pid"]) and _answers(stack["pg_url"])
    names = {row[0] for row in _query(stack["pg_url"], "postgres", "SELECT datname FROM pg_database")}
    assert {"prefect", "mlflow"} <= names  # its data stays too
