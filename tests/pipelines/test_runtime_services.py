"""What the project's services listen on, and who may call them.

The shipped commands and configs bind dashboards and APIs to 127.0.0.1, and never turn Ray's
token auth off. The local Ray (`init_ray`, the `ray_local` fixture) cannot be kept to 127.0.0.1:
its gRPC servers bind every interface. Measured here, on every socket it listens on beyond
loopback: a caller without the token is refused (gRPC UNAUTHENTICATED, HTTP 401), or the port
serves only Prometheus metrics (read-only text).
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import re
import shlex
import socket
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = [ROOT / "infra", ROOT / "configs", ROOT / "pipelines", ROOT / "flows", ROOT / "mmfusion"]


def _shipped_files() -> list[Path]:
    """Code, configs and scripts (the docs name 0.0.0.0 to warn against it)."""
    return [p for d in SHIPPED for p in d.rglob("*")
            if p.is_file() and p.suffix not in (".pyc", ".md") and "__pycache__" not in p.parts]


def test_no_shipped_file_binds_every_interface_or_turns_ray_auth_off():
    from pipelines import runtime

    offenders = []
    for path in _shipped_files():
        text = path.read_text(errors="replace")
        for pattern in (r"0\.0\.0\.0", r"RAY_AUTH_MODE\W+disabled", r"--host[= ]+\[?::(?!1)",
                        r"(?:dashboard[-_]host|--host)[= ]+[\"']?(?!127\.0\.0\.1\b)\d[\d.]*"):
            offenders += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert not offenders, offenders
    assert runtime.LOCAL_DASHBOARD_HOST == "127.0.0.1"


def _flag(words: list[str], name: str) -> str | None:
    for i, word in enumerate(words):
        if word == name and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(f"{name}="):
            return word.split("=", 1)[1]
    return None


def test_the_local_stack_binds_every_service_to_loopback(tmp_path):
    """`mmfusion stack`'s commands (pipelines/ops/services.py), as it would run them."""
    from pipelines.ops.services import (
        mlflow_service,
        postgres_service,
        prefect_server_service,
        ray_head_service,
        ray_worker_service,
    )

    ports = dict.fromkeys(("postgres", "prefect", "mlflow", "ray_gcs", "ray_dashboard", "ray_client",
                           "ray_head_agent", "ray_worker_agent"), 1)
    state = {"ports": ports, "postgres_password": "pw", "postgres_url": "postgresql://u:pw@127.0.0.1:1/x",
             "artifacts": str(tmp_path), "ray_temp": str(tmp_path / "ray"), "object_store_mb": 100}
    head, worker = ray_head_service(state, tmp_path), ray_worker_service(state, tmp_path)
    assert _flag(head.argv, "--dashboard-host") == "127.0.0.1"
    for ray in (head, worker):
        assert _flag(ray.argv, "--node-ip-address") == "127.0.0.1"
        assert ray.env["RAY_AUTH_MODE"] == "token"  # explicit, whatever the caller's environment says
    for svc in (prefect_server_service(state, tmp_path), mlflow_service(state, tmp_path)):
        assert _flag(svc.argv, "--host") == "127.0.0.1", svc.argv
    assert "listen_addresses=127.0.0.1" in postgres_service(state, tmp_path).argv


def test_the_cluster_keeps_dashboard_on_loopback_and_token_auth_on():
    cluster = yaml.safe_load((ROOT / "infra" / "ray" / "cluster.yaml").read_text())
    (head,) = [c for c in cluster["head_start_ray_commands"] if "ray start" in c]
    words = shlex.split(head)
    assert _flag(words, "--dashboard-host") == "127.0.0.1"
    for command in [head] + [c for c in cluster["worker_start_ray_commands"] if "ray start" in c]:
        assert "RAY_AUTH_MODE=token" in shlex.split(command), command
    assert "~/.ray/auth_token" in cluster["file_mounts"]  # every node gets the token


def _listeners(pids: set[int]) -> set[tuple[str, str, int]]:
    """(process name, address, port) of the TCP sockets these processes listen on."""
    out = set()
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for c in proc.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    out.add((proc.name(), c.laddr.ip, c.laddr.port))
        except psutil.Error:
            pass
    return out


def _outside_address() -> str:
    """An address of this machine other than loopback (what a neighbour would connect to)."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                return a.address
    pytest.skip("this machine has no address beyond loopback")


# One real method of each Ray gRPC service: an unknown method is UNIMPLEMENTED before any auth.
_RAY_METHODS = ("/ray.rpc.NodeInfoGcsService/GetAllNodeInfo", "/ray.rpc.NodeManagerService/GetNodeStats",
                "/ray.rpc.CoreWorkerService/NumPendingTasks", "/ray.rpc.ReporterService/HealthCheck",
                "/ray.rpc.LogService/ListLogs", "/ray.rpc.ObjectManagerService/Pull")


def _grpc_refuses_without_token(address: str) -> str:
    """How a Ray gRPC server answers its own methods called with no token: UNAUTHENTICATED
    when any of them is refused for want of one, else the answers."""
    import grpc

    answers = []
    with grpc.insecure_channel(address) as channel:
        for method in _RAY_METHODS:
            try:
                channel.unary_unary(method)(b"", timeout=10)
                answers.append("OK")
            except grpc.RpcError as e:
                answers.append(e.code().name)
    return "UNAUTHENTICATED" if "UNAUTHENTICATED" in answers else "/".join(sorted(set(answers)))


def _probe(host: str, port: int) -> str:
    """'401', 'metrics', 'UNAUTHENTICATED' (refused), or what else it answered."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/", timeout=5) as r:
            return "metrics" if r.read(6) == b"# HELP" else f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return str(e.code)
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        if "timed out" in str(e):
            return "timeout"
        return _grpc_refuses_without_token(f"{host}:{port}")  # not HTTP/1: gRPC


def test_local_ray_refuses_callers_without_the_token(ray_local):
    from ray._raylet import AuthenticationMode, get_authentication_mode

    assert get_authentication_mode() == AuthenticationMode.TOKEN, os.environ.get("RAY_AUTH_MODE")
    pids = {p.pid for p in psutil.Process().children(recursive=True)}
    outside = _outside_address()
    answers = {}
    for name, ip, port in sorted(_listeners(pids)):
        if ipaddress.ip_address(ip.split("%")[0]).is_loopback:
            continue
        host = outside if ip in ("0.0.0.0", "::") else ip
        answers[f"{name} {ip}:{port}"] = _probe(host, port)
    assert answers, "the local Ray listens on no address beyond loopback: the token is moot here"
    open_ports = {k: a for k, a in answers.items() if a not in ("401", "UNAUTHENTICATED", "metrics")}
    assert not open_ports, f"answered without a token: {open_ports} (all answers: {answers})"
    assert "UNAUTHENTICATED" in answers.values()  # the GCS and raylets: the ports that run code
