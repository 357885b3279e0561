"""The issue's "done when", on real servers: `eval "$(mmfusion stack up)"`, `mmfusion deploy`,
`prefect deployment run retrain/smoke --watch`, `mmfusion registry list`, `mmfusion stack down`.

One stack for the module (PostgreSQL, Prefect server + process worker, MLflow server, Ray head +
worker node), plus another Ray on the machine that `down` must leave alone. The tests run in file
order; the last one takes the stack down. Each step's time is printed (`-s` shows it).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from pipelines.ops import procs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SERVICES = ["postgres", "ray-head", "ray-worker", "mlflow", "prefect-server", "prefect-worker"]


def _sh(script: str, env: dict[str, str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run(["bash", "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    elapsed = time.monotonic() - started
    print(f"\n[{elapsed:6.1f} s] {script.splitlines()[0][:90]} -> rc {done.returncode}")
    return done, elapsed


def _other_ray(temp: str, env: dict[str, str], log: Path) -> int:
    """Someone else's Ray on this machine: its own temp dir, ports and token."""
    argv = [str(BIN / "ray"), "start", "--head", "--block", "--port", str(procs.free_port()),
            "--node-ip-address", "127.0.0.1", "--include-dashboard", "false", "--num-cpus", "1",
            "--dashboard-agent-listen-port", str(procs.free_port()), "--ray-client-server-port",
            str(procs.free_port()), "--temp-dir", temp, "--object-store-memory", str(100 * 2**20)]
    other_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    return procs.spawn(argv, other_env, log)


@pytest.fixture(scope="module")
def stack():
    home_root = Path(tempfile.mkdtemp(prefix="mmf-stack-test-"))
    os.chmod(home_root, 0o755)  # as root, PostgreSQL runs as `postgres`, which must reach its data dir
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN", "PREFECT_HOME")}
    env.update(MMFUSION_HOME=str(home_root / "home"), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               OMP_NUM_THREADS="1")
    other_temp = f"/tmp/mmf-other-{secrets.token_hex(4)}"
    other = _other_ray(other_temp, env, home_root / "other-ray.log")
    ctx = {"env": env, "home": home_root / "home", "other": other, "times": {}}
    try:
        yield ctx
    finally:
        subprocess.run([str(BIN / "mmfusion"), "stack", "down"], env=env, cwd=ROOT, timeout=300)
        procs.terminate(other, procs.pids_with(other_temp))
        shutil.rmtree(other_temp, ignore_errors=True)
        shutil.rmtree(home_root, ignore_errors=True)
        print("\nstep times (s):", json.dumps({k: round(v, 1) for k, v in ctx["times"].items()}))


def _state(ctx) -> dict:
    return json.loads((ctx["home"] / "stack" / "state.json").read_text())


def _client_env(ctx, exports: str) -> dict[str, str]:
    """The environment after `eval "$(mmfusion stack up)"`, as a shell gets it."""
    done = subprocess.run(["bash", "-c", f'{exports}\nenv -0'], env=ctx["env"], capture_output=True,
                          timeout=30, check=True)
    return dict(line.split("=", 1) for line in done.stdout.decode().split("\0") if "=" in line)


def test_up_starts_every_service_healthy_and_bound_to_loopback(stack):
    done, stack["times"]["stack up"] = _sh('eval "$(mmfusion stack up)" && env -0 > "$MMFUSION_HOME/../env"',
                                           stack["env"], 900)
    assert done.returncode == 0, done.stderr
    env = dict(x.split("=", 1) for x in (stack["home"].parent / "env").read_text().split("\0") if "=" in x)
    state = _state(stack)
    assert env["PREFECT_API_URL"] == f"http://127.0.0.1:{state['ports']['prefect']}/api"
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{state['ports']['mlflow']}"
    assert env["RAY_ADDRESS"] == f"127.0.0.1:{state['ports']['ray_gcs']}" and env["RAY_AUTH_MODE"] == "token"
    stack["client_env"] = env
    status, _ = _sh("mmfusion stack status", env, 120)
    assert status.returncode == 0, status.stdout + status.stderr
    assert [line.split()[:2] for line in status.stdout.splitlines()] == [[s, "healthy"] for s in SERVICES]
    # the servers answer on loopback only
    for name, port in (("postgres", "postgres"), ("mlflow", "mlflow"), ("prefect-server", "prefect")):
        leader = state["pids"][name]["pid"]
        bound = {c.laddr.ip for pid in procs.session_members(leader) for c in psutil.Process(pid).net_connections()
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == state["ports"][port]}
        assert bound == {"127.0.0.1"}, (name, bound)


def test_up_again_reports_what_runs_and_starts_nothing(stack):
    before = _state(stack)["pids"]
    done, stack["times"]["stack up (again)"] = _sh("mmfusion stack up", stack["client_env"], 300)
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stderr.splitlines() if "already running" in line] == SERVICES
    assert "starting" not in done.stderr
    assert _state(stack)["pids"] == before
    exports = _client_env(stack, done.stdout)
    assert {k: exports[k] for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")} == \
        {k: stack["client_env"][k] for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")}


def test_deploy_then_a_worker_run_registers_a_champion_on_the_servers(stack):
    env = stack["client_env"]
    done, stack["times"]["deploy"] = _sh("mmfusion deploy --config configs/debug.yaml --name smoke", env, 300)
    assert done.returncode == 0, done.stderr
    assert "deployed retrain/smoke" in done.stdout and "deployed ingest/smoke" in done.stdout
    run, stack["times"]["deployment run --watch"] = _sh("prefect deployment run retrain/smoke --watch", env, 900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Completed" in run.stdout
    state = _state(stack)
    worker_log = Path(state["pids"]["prefect-worker"]["log"]).read_text()
    # the worker's flow run used the stack's Ray cluster, not a Ray of its own
    assert "Connecting to existing Ray cluster at address: " in worker_log
    assert f":{state['ports']['ray_gcs']}..." in worker_log
    reg, stack["times"]["registry list"] = _sh("mmfusion registry list", env, 300)
    assert reg.returncode == 0, reg.stderr
    assert "mmfusion-debug" in reg.stdout and "'champion': '1'" in reg.stdout, reg.stdout
    # ... and it came from the MLflow server, whose database is the stack's PostgreSQL
    assert not (stack["home"] / "mlflow.db").exists()


def test_down_stops_everything_it_started_and_leaves_another_ray_alone(stack):
    state = _state(stack)
    ours = {pid for entry in state["pids"].values() for pid in procs.session_members(entry["pid"])}
    ours |= set(procs.pids_with(state["ray_temp"]))
    assert len(ours) > 10 and procs.alive(stack["other"])
    other_tree = set(procs.session_members(stack["other"]))
    done, stack["times"]["stack down"] = _sh("mmfusion stack down", stack["client_env"], 300)
    assert done.returncode == 0, done.stderr
    assert [p for p in ours if procs.alive(p)] == []
    assert procs.pids_with(state["ray_temp"]) == [] and not Path(state["ray_temp"]).exists()
    assert not any(procs.port_open(p) for p in state["ports"].values())
    assert all(procs.alive(p) for p in other_tree), "down touched a Ray it did not start"
    status, _ = _sh("mmfusion stack status", stack["client_env"], 120)
    assert status.returncode == 1 and all(line.split()[1] == "stopped" for line in status.stdout.splitlines())
