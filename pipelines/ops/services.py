"""The stack's services: how each starts (argv, environment), where it listens, how it is healthy.

Every service binds 127.0.0.1; Ray, whose gRPC servers bind every interface whatever the flags,
keeps token authentication on with a token of the stack's own (`RAY_AUTH_TOKEN_PATH`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.ops import postgres
from pipelines.ops.procs import LOOPBACK
from pipelines.runtime import QUIET_ENV

WORK_POOL = "mmfusion"


class StackError(RuntimeError):
    """The stack cannot start or stop; the message names the service, the input and the fix."""


@dataclass
class Service:
    name: str
    address: str
    argv: list[str]
    env: dict[str, str]
    healthy: Callable[[], bool]
    port: int | None = None
    user: str | None = None
    stop_signal: int = signal.SIGTERM
    start_timeout_s: float = 240.0
    cwd: str | None = None
    extra: dict = field(default_factory=dict)


def tool(name: str) -> str:
    """A console script of this environment (ray, prefect, mlflow), named in the error when missing."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise StackError(f"`{name}` is not installed next to {sys.executable}: run `pip install -e .` "
                         "in this environment (it brings ray, prefect and mlflow)")
    return str(path)


def http_get(url: str, headers: dict[str, str] | None = None, data: bytes | None = None, timeout: float = 5.0):
    """The decoded JSON (or text) body of a GET (or POST with `data`) to a local service."""
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body = resp.read().decode()
    try:
        return json.loads(body)
    except ValueError:
        return body


def base_env() -> dict[str, str]:
    """The caller's environment with the quiet defaults, minus what would point a service at
    another stack (each service gets its own addresses below)."""
    env = {**QUIET_ENV, **os.environ}
    for key in ("RAY_ADDRESS", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN",
                "PREFECT_API_DATABASE_CONNECTION_URL", "MLFLOW_BACKEND_STORE_URI"):
        env.pop(key, None)
    return env


def ray_env(token_path: Path, gcs_port: int) -> dict[str, str]:
    """Token auth with the stack's token. RAY_ADDRESS reaches every worker process: Ray Train's
    placement-group cleaner looks its cluster up by address, and on a machine with several Rays
    (the stack's, the user's) the guess fails with "Found multiple active Ray instances"."""
    return {**base_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path),
            "RAY_ADDRESS": f"{LOOPBACK}:{gcs_port}"}


def ray_nodes(dashboard_port: int, token_path: Path) -> list[dict]:
    """The live nodes of the stack's Ray, from its dashboard's state API (with the token)."""
    token = token_path.read_text().strip()
    body = http_get(f"http://{LOOPBACK}:{dashboard_port}/api/v0/nodes?limit=100",
                    headers={"Authorization": f"Bearer {token}"})
    nodes = body["data"]["result"]["result"]
    return [n for n in nodes if n.get("state") == "ALIVE"]


def postgres_service(state: dict, sdir: Path) -> Service:
    port, data_dir = state["ports"]["postgres"], sdir / "postgres"
    url = postgres.local_url(port, state["postgres_password"])
    return Service("postgres", f"{LOOPBACK}:{port} (data {data_dir})", postgres.server_argv(data_dir, port),
                   base_env(), lambda: postgres.ready(url), port=port, user=postgres.run_as(),
                   stop_signal=signal.SIGINT,  # "fast" shutdown: clients are cut off, no waiting
                   extra={"data_dir": data_dir})


def ray_head_service(state: dict, sdir: Path) -> Service:
    ports, token = state["ports"], sdir / "ray_token"
    argv = [tool("ray"), "start", "--head", "--block", "--port", str(ports["ray_gcs"]),
            "--node-ip-address", LOOPBACK, "--dashboard-host", LOOPBACK, "--include-dashboard", "true",
            "--dashboard-port", str(ports["ray_dashboard"]), "--ray-client-server-port", str(ports["ray_client"]),
            "--dashboard-agent-listen-port", str(ports["ray_head_agent"]), "--temp-dir", state["ray_temp"],
            "--object-store-memory", str(state["object_store_mb"] * 2**20), "--disable-usage-stats"]
    return Service("ray-head", f"{LOOPBACK}:{ports['ray_gcs']} (dashboard http://{LOOPBACK}:{ports['ray_dashboard']})",
                   argv, ray_env(token, ports["ray_gcs"]), lambda: len(ray_nodes(ports["ray_dashboard"], token)) >= 1,
                   port=ports["ray_gcs"])


def ray_worker_service(state: dict, sdir: Path) -> Service:
    ports, token = state["ports"], sdir / "ray_token"
    argv = [tool("ray"), "start", "--block", "--address", f"{LOOPBACK}:{ports['ray_gcs']}",
            "--node-ip-address", LOOPBACK, "--dashboard-agent-listen-port", str(ports["ray_worker_agent"]),
            "--object-store-memory", str(state["object_store_mb"] * 2**20), "--disable-usage-stats"]
    return Service("ray-worker", f"node of {LOOPBACK}:{ports['ray_gcs']}", argv, ray_env(token, ports["ray_gcs"]),
                   lambda: len(ray_nodes(ports["ray_dashboard"], token)) >= 2)


def check_artifacts(uri: str) -> None:
    """An `s3://` artifact root needs boto3 in the server's environment, which MLflow does not
    bring; say so before the server fails on its first upload."""
    import importlib.util

    if uri.startswith("s3://") and importlib.util.find_spec("boto3") is None:
        raise StackError(f"--artifacts {uri}: the MLflow server needs boto3 for s3:// artifacts; "
                         f"`pip install boto3` in {sys.prefix}, or pass a local path")


def mlflow_service(state: dict, sdir: Path) -> Service:
    """Its backend store on PostgreSQL; artifacts proxied (`--serve-artifacts`) to `state["artifacts"]`,
    a local path or an s3:// URI (an S3-compatible server: MLFLOW_S3_ENDPOINT_URL and the AWS_*
    keys, from the environment of `mmfusion stack up`)."""
    port = state["ports"]["mlflow"]
    env = {**base_env(), "MLFLOW_BACKEND_STORE_URI": postgres.with_database(state["postgres_url"], "mlflow", "psycopg2")}
    argv = [tool("mlflow"), "server", "--host", LOOPBACK, "--port", str(port), "--workers", "1",
            "--serve-artifacts", "--artifacts-destination", state["artifacts"]]
    url = f"http://{LOOPBACK}:{port}"
    return Service("mlflow", url, argv, env, lambda: str(http_get(f"{url}/health")).strip() == "OK", port=port)


def prefect_server_service(state: dict, sdir: Path) -> Service:
    port = state["ports"]["prefect"]
    url = f"http://{LOOPBACK}:{port}"
    env = {**base_env(), "PREFECT_HOME": str(sdir / "prefect-home"), "PREFECT_UI_ENABLED": "true",
           "PREFECT_UI_API_URL": f"{url}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_DATABASE_CONNECTION_URL": postgres.with_database(state["postgres_url"], "prefect", "asyncpg")}
    argv = [tool("prefect"), "server", "start", "--host", LOOPBACK, "--port", str(port)]
    return Service("prefect-server", f"{url} (API {url}/api)", argv, env,
                   lambda: http_get(f"{url}/api/health") is True, port=port)


def worker_online(api_url: str, name: str) -> bool:
    workers = http_get(f"{api_url}/work_pools/{WORK_POOL}/workers/filter", data=b"{}")
    return any(w.get("name") == name and w.get("status") == "ONLINE" for w in workers)


def prefect_worker_service(state: dict, sdir: Path, client_env: dict[str, str]) -> Service:
    """A process worker on pool `mmfusion`: its flow runs see the stack's Ray, MLflow and home."""
    name = f"mmfusion-stack-{state['ports']['prefect']}"
    bin_dir = str(Path(sys.executable).parent)
    env = {**base_env(), **client_env, "PREFECT_HOME": str(sdir / "prefect-home"),
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}  # `python` of flow runs: this venv
    argv = [tool("prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process", "--name", name]
    api = client_env["PREFECT_API_URL"]
    return Service("prefect-worker", f"pool {WORK_POOL!r} as {name}", argv, env,
                   lambda: worker_online(api, name), cwd=str(sdir))
