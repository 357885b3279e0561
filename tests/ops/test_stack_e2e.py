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
import urllib.request
from pathlib import Path

import psutil
import pytest

from pipelines.ops import procs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SCREENSHOTS = Path(os.environ.get("MMFUSION_SCREENSHOTS", ROOT / "test-output" / "screenshots"))
SERVICES = ["postgres", "ray-head", "ray-worker", "mlflow", "prefect-server", "prefect-worker"]


def _sh(script: str, env: dict[str, str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run(["bash", "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    elapsed = time.monotonic() - started
    print(f"\n[{elapsed:6.1f} s] {script.splitlines()[0][:90]} -> rc {done.returncode}")
    if "stack" in script:  # each service's line: started / already running / stopped, with times
        print("\n".join("    " + line for line in done.stderr.splitlines() if "Warning" not in line))
    return done, elapsed


def _other_ray(temp: str, env: dict[str, str], log: Path) -> int:
    """Someone else's Ray on this machine: its own temp dir, ports and token; up before we go on."""
    port = procs.free_port()
    argv = [str(BIN / "ray"), "start", "--head", "--block", "--port", str(port),
            "--node-ip-address", "127.0.0.1", "--include-dashboard", "false", "--num-cpus", "1",
            "--dashboard-agent-listen-port", str(procs.free_port()), "--ray-client-server-port",
            str(procs.free_port()), "--temp-dir", temp, "--object-store-memory", str(100 * 2**20)]
    other_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    pid = procs.spawn(argv, other_env, log)
    up = procs.wait_until(lambda: "--block" in log.read_text() or not procs.alive(pid), 300)
    assert up and procs.alive(pid), f"the other Ray did not start; its log {log}:\n{procs.log_tail(log)}"
    return pid


@pytest.fixture(scope="module")
def stack():
    home_root = Path(tempfile.mkdtemp(prefix="mmf-stack-test-"))
    os.chmod(home_root, 0o755)  # as root, PostgreSQL runs as `postgres`, which must reach its data dir
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN", "PREFECT_HOME")}
    env.update(MMFUSION_HOME=str(home_root / "home"), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               OMP_NUM_THREADS="1")
    other_temp = f"/tmp/mmf-other-{secrets.token_hex(4)}"
    SCREENSHOTS.parent.mkdir(parents=True, exist_ok=True)  # its log outlives the test's home
    other = _other_ray(other_temp, env, SCREENSHOTS.parent / "other-ray.log")
    ctx = {"env": env, "home": home_root / "home", "other": other, "times": {}}
    try:
        yield ctx
    finally:
        subprocess.run([str(BIN / "mmfusion"), "stack", "down"], env=env, cwd=ROOT, timeout=300)
        procs.terminate(other, procs.pids_with(other_temp))
        shutil.rmtree(other_temp, ignore_errors=True)
        shutil.rmtree(home_root, ignore_errors=True)
        times = {k: round(v, 1) for k, v in ctx["times"].items()}
        print("\nstep times (s):", json.dumps(times))
        # Beside the screenshots, so that a run without `-s` (CI) keeps them too.
        (SCREENSHOTS.parent / "stack-e2e-times.json").write_text(json.dumps(times, indent=1) + "\n")


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
    # training's progress: plain lines in the worker's log (not a terminal), each once, from the
    # driver (not also forwarded by Ray from rank 0); and in the flow run's log in the UI
    progress = [line for line in worker_log.splitlines() if "[train] " in line and " steps (" in line]
    assert progress and all(line.startswith("[train] ") for line in progress), progress
    assert len(progress) == len(set(progress)), progress
    (smoke,) = _api(env, "/flow_runs/filter", {"deployments": {"name": {"any_": ["smoke"]}},
                                               "flows": {"name": {"any_": ["retrain"]}}})
    logged = [log["message"] for log in _run_logs(env, smoke["id"]) if log["name"] == "mmfusion.train.progress"]
    assert set(logged) == set(progress) and any("(100%)" in m for m in logged), (logged, progress)
    reg, stack["times"]["registry list"] = _sh("mmfusion registry list", env, 300)
    assert reg.returncode == 0, reg.stderr
    assert "mmfusion-debug" in reg.stdout and "'champion': '1'" in reg.stdout, reg.stdout
    # ... and it came from the MLflow server, whose database is the stack's PostgreSQL
    assert not (stack["home"] / "mlflow.db").exists()


def _api(env: dict[str, str], path: str, body: dict | None = None, method: str | None = None):
    """Prefect's REST API, as the UI calls it."""
    req = urllib.request.Request(env["PREFECT_API_URL"] + path,
                                 method=method or ("POST" if body is not None else "GET"),
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        text = resp.read()
    return json.loads(text) if text else None


def _run_logs(env: dict[str, str], flow_run_id: str) -> list[dict]:
    """Every log record of a flow run, as its page in the UI shows them."""
    logs: list[dict] = []
    while page := _api(env, "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC",
                                             "offset": len(logs), "limit": 200}):
        logs += page
    return logs


def test_the_ui_triggers_a_typed_ingest_and_a_cron_deployment_gets_scheduled_runs(stack):
    env = stack["client_env"]
    ingest = _api(env, "/deployments/name/ingest/smoke")
    schema = ingest["parameter_openapi_schema"]
    assert schema["required"] == ["source"]
    formats = json.dumps(schema["properties"]["format"]) + json.dumps(schema.get("definitions", {}))
    assert all(f in formats for f in ("coco", "jsonl", "webdataset"))  # a typed choice, not free text
    # the UI's "Run": a flow run created from the deployment, with the engineer's parameters
    raw = next((stack["home"] / "raw").glob("synth-*"))
    started = time.monotonic()
    run = _api(env, f"/deployments/{ingest['id']}/create_flow_run",
               {"parameters": {"source": str(raw), "format": "jsonl"}})
    assert procs.wait_until(lambda: _api(env, f"/flow_runs/{run['id']}")["state"]["type"] in
                            ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"), 600, 2)
    stack["times"]["ingest run from the API (UI path)"] = time.monotonic() - started
    final = _api(env, f"/flow_runs/{run['id']}")
    assert final["state"]["type"] == "COMPLETED", final["state"]
    # a cron deployment: the server's scheduler lays out its next runs
    done, stack["times"]["deploy --cron"] = _sh(
        "mmfusion deploy --config configs/debug.yaml --name nightly --cron '0 2 * * *'", env, 300)
    assert done.returncode == 0, done.stderr
    nightly = _api(env, "/deployments/name/retrain/nightly")
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]

    def scheduled() -> list:
        return _api(env, "/flow_runs/filter", {"deployments": {"id": {"any_": [nightly["id"]]}},
                                               "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})
    assert procs.wait_until(lambda: len(scheduled()) > 0, 180, 3), "the scheduler made no run"
    assert all(r["expected_start_time"][11:16] == "02:00" for r in scheduled())
    status, stack["times"]["mmfusion status"] = _sh("mmfusion status --config configs/debug.yaml", env, 300)
    assert status.returncode == 0, status.stderr
    print(status.stdout)
    lines = status.stdout.splitlines()
    assert any(line.startswith("  mmfusion-debug v1") for line in lines), status.stdout
    assert any("retrain" in line and "Completed" in line for line in lines)
    assert any("ingest" in line and "Completed" in line for line in lines)
    assert any(line.startswith("  next: retrain") and "02:00:00" in line for line in lines)
    assert sum(line.strip().startswith(("head", "worker")) for line in lines) == 2


def test_a_scheduled_run_is_executed_by_the_worker_and_skips_unchanged_training(stack):
    """A schedule that fires within a minute (cron `* * * * *`): the worker runs a run the scheduler
    made, not a manual trigger, to Completed. Data, config and code are those `smoke` trained
    on, so the retrain is skipped as unchanged. Then the deployment goes, so nothing keeps firing."""
    env = stack["client_env"]
    started = time.monotonic()
    done, _ = _sh("mmfusion deploy --config configs/debug.yaml --name every-minute --cron '* * * * *'", env, 300)
    assert done.returncode == 0, done.stderr
    dep = _api(env, "/deployments/name/retrain/every-minute")

    def runs(*states: str) -> list:
        flow_runs = {"state": {"type": {"any_": list(states)}}} if states else {}
        return _api(env, "/flow_runs/filter", {"deployments": {"id": {"any_": [dep["id"]]}}, "flow_runs": flow_runs})

    active = ("PENDING", "RUNNING", "COMPLETED", "FAILED", "CRASHED", "CANCELLING", "CANCELLED", "PAUSED")
    assert procs.wait_until(lambda: len(runs(*active)) > 0, 240, 2), f"the worker started no scheduled run: {runs()}"
    stack["times"]["deploy --cron '* * * * *' until the worker starts a scheduled run"] = time.monotonic() - started
    # one is enough: pause the schedule, which deletes the runs it laid out and makes no more
    _api(env, f"/deployments/{dep['id']}/pause_deployment", {})
    assert runs("SCHEDULED") == []
    picked = runs(*active)
    final = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
    assert procs.wait_until(lambda: all(r["state"]["type"] in final for r in runs(*active)), 600, 2), runs(*active)
    stack["times"]["scheduled run (skipped: unchanged)"] = time.monotonic() - started
    for run in runs(*active):
        messages = [log["message"] for log in _run_logs(env, run["id"])]
        assert run["state"]["type"] == "COMPLETED", (run["state"], messages[-20:])
        assert run["auto_scheduled"] and run["created_by"]["type"] == "SCHEDULE"  # not a trigger's
        skipped = _api(env, "/artifacts/filter", {"artifacts": {"key": {"any_": ["retrain-skipped"]},
                                                                "flow_run_id": {"any_": [run["id"]]}}})
        assert skipped, ("it trained: data, config or code differ from smoke's",
                         [m for m in messages if "[retrain]" in m or "[train]" in m][:20])
        assert "nothing changed since champion" in skipped[0]["data"], skipped[0]["data"]
    print(f"scheduled runs executed by the worker: {[r['name'] for r in picked]}")
    # `mmfusion deploy` made ingest/every-minute too (no schedule): both go
    for gone in (dep, _api(env, "/deployments/name/ingest/every-minute")):
        _api(env, f"/deployments/{gone['id']}", method="DELETE")
    assert [d["name"] for d in _api(env, "/deployments/filter", {}) if d["name"] == "every-minute"] == []


def _browser(playwright):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.fail("Debian's `chromium` is not installed (`.ci/run` installs it: apt-get install chromium)")
    return playwright.chromium.launch(executable_path=chromium, headless=True,
                                      args=["--no-sandbox", "--disable-dev-shm-usage"])


def _shoot(page, url: str | None, expect: list[str], name: str, click: str | None = None) -> Path:
    """Open `url` (None: stay), click the tab named `click`, wait until every text in `expect`
    shows, save a full-page screenshot."""
    if url:
        page.goto(url, wait_until="load", timeout=120_000)
    if click:
        page.get_by_text(click, exact=True).first.click(timeout=60_000)
    for text in expect:
        page.get_by_text(text, exact=False).first.wait_for(state="visible", timeout=120_000)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    print(f"screenshot: {path}")
    return path


def _loaded_images(page, src_prefix: str, at_least: int, min_width: int = 1) -> None:
    """Wait until the page shows `at_least` decoded images whose src starts with `src_prefix`."""
    page.wait_for_function(
        "([p, n, w]) => [...document.images].filter(i => i.src.startsWith(p) && i.naturalWidth >= w).length >= n",
        arg=[src_prefix, at_least, min_width], timeout=120_000)


def _mlflow_api(base: str, path: str) -> dict:
    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/{path}", timeout=30) as resp:
        return json.loads(resp.read())


def test_a_browser_sees_the_completed_run_and_the_champion(stack):
    """Headless Chromium on the Prefect UI (the flow run, Completed, with its report artifact) and on
    the MLflow UI (the registered model with its `champion` alias, and the version's run)."""
    from playwright.sync_api import sync_playwright

    env = stack["client_env"]
    runs = _api(env, "/flow_runs/filter", {"deployments": {"name": {"any_": ["smoke"]}},
                                           "flows": {"name": {"any_": ["retrain"]}}})
    (run,) = [r for r in runs if r["state"]["type"] == "COMPLETED"]
    prefect_ui = env["PREFECT_API_URL"].removesuffix("/api")
    mlflow_ui = env["MLFLOW_TRACKING_URI"]
    started = time.monotonic()
    with sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            _shoot(page, f"{prefect_ui}/runs/flow-run/{run['id']}", [run["name"], "Completed"], "prefect-flow-run")
            _shoot(page, None, ["retrain-report"], "prefect-flow-run-artifacts", click="Artifacts")
            (report,) = _api(env, "/artifacts/filter", {"artifacts": {"key": {"any_": ["retrain-report"]},
                                                                       "flow_run_id": {"any_": [run["id"]]}}})
            _shoot(page, f"{prefect_ui}/artifacts/artifact/{report['id']}", ["Data quality", "Learning curves"],
                   "prefect-retrain-report")
            _loaded_images(page, "data:image/png", at_least=2)  # learning curves and example captions
            _shoot(page, f"{mlflow_ui}/#/models/mmfusion-debug", ["mmfusion-debug", "champion"], "mlflow-model")
            _shoot(page, f"{mlflow_ui}/#/models/mmfusion-debug/versions/1", ["champion", "mmfusion-debug", "Lineage"],
                   "mlflow-model-version")
            mv = _mlflow_api(mlflow_ui, "model-versions/get?name=mmfusion-debug&version=1")["model_version"]
            exp = _mlflow_api(mlflow_ui, f"runs/get?run_id={mv['run_id']}")["run"]["info"]["experiment_id"]
            _shoot(page, f"{mlflow_ui}/#/experiments/{exp}/runs/{mv['run_id']}/artifacts/figures/learning_curves.png",
                   ["learning_curves.png"], "mlflow-run-figure")
            _loaded_images(page, "", at_least=1, min_width=300)
        finally:
            browser.close()
    stack["times"]["browser screenshots"] = time.monotonic() - started


def test_down_stops_everything_it_started_and_leaves_another_ray_alone(stack):
    state = _state(stack)
    ours = {pid for entry in state["pids"].values() for pid in procs.session_members(entry["pid"])}
    ours |= set(procs.pids_with(state["ray_temp"]))
    assert len(ours) > 10
    assert procs.alive(stack["other"]), f"the other Ray ended by itself: {SCREENSHOTS.parent / 'other-ray.log'}"
    other_tree = set(procs.session_members(stack["other"]))
    done, stack["times"]["stack down"] = _sh("mmfusion stack down", stack["client_env"], 300)
    assert done.returncode == 0, done.stderr
    assert [p for p in ours if procs.alive(p)] == []
    assert procs.pids_with(state["ray_temp"]) == [] and not Path(state["ray_temp"]).exists()
    assert not any(procs.port_open(p) for p in state["ports"].values())
    assert all(procs.alive(p) for p in other_tree), "down touched a Ray it did not start"
    status, _ = _sh("mmfusion stack status", stack["client_env"], 120)
    assert status.returncode == 1 and all(line.split()[1] == "stopped" for line in status.stdout.splitlines())
