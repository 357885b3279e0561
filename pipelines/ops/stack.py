"""`mmfusion stack up | status | down`: the local servers, their state file and their order.

State and logs live in `$MMFUSION_HOME/stack/`: `state.json` (ports, pids, the database URL;
readable by its owner only), `ray_token`, one `<service>.log` per service. `down` stops exactly
the sessions `up` started (each service is the leader of a session of its own; Ray's actors
leave its process group but not its session), then any process that still names the stack's
private Ray temp dir in its command line; never a bare `ray stop`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pipelines.ops import postgres, procs
from pipelines.ops.services import (
    Service,
    StackError,
    check_artifacts,
    mlflow_service,
    postgres_service,
    prefect_server_service,
    prefect_worker_service,
    ray_head_service,
    ray_worker_service,
)

ORDER = ("postgres", "ray-head", "ray-worker", "mlflow", "prefect-server", "prefect-worker")
PORTS = ("postgres", "prefect", "mlflow", "ray_gcs", "ray_dashboard", "ray_client", "ray_head_agent",
         "ray_worker_agent")

__all__ = ["ORDER", "Stack", "StackError"]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _ours(entry: dict | None) -> bool:
    """The process we started still runs: same pid and the same command line (not a reused pid)."""
    return bool(entry) and procs.alive(entry["pid"]) and procs.cmdline(entry["pid"]) == entry["cmdline"]


class Stack:
    """The stack under `home/stack`. `postgres_url`: the user's own server (none is started);
    `artifacts`: the MLflow server's artifact root (a local path or an s3:// URI)."""

    def __init__(self, home: Path, postgres_url: str | None = None, artifacts: str | None = None,
                 say: Callable[[str], None] = _stderr):
        self.home = Path(home).expanduser().resolve()
        self.dir = self.home / "stack"
        self.state_path = self.dir / "state.json"
        self.say = say
        self.postgres_url, self.artifacts = postgres_url, artifacts

    # state ---------------------------------------------------------------------------------
    def load(self) -> dict:
        return json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    def save(self, state: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.chmod(tmp, 0o600)  # it holds the database password
        tmp.replace(self.state_path)

    def fresh_state(self, old: dict) -> dict:
        """Ports, secrets and the Ray temp dir for a stack with nothing running."""
        password = old.get("postgres_password") or secrets.token_urlsafe(24)
        ports = {name: procs.free_port() for name in PORTS}
        external = self.postgres_url or old.get("external_postgres")
        state = {
            "ports": ports, "postgres_password": password, "external_postgres": external,
            "postgres_url": external or postgres.local_url(ports["postgres"], password),
            "artifacts": self.artifacts or old.get("artifacts") or str(self.dir / "mlflow-artifacts"),
            # short (Ray's socket paths live under it) and the stack's own: `ray start` makes it
            "ray_temp": str(Path(tempfile.gettempdir()) / f"mmf-ray-{secrets.token_hex(4)}"),
            "object_store_mb": int(os.environ.get("MMFUSION_STACK_OBJECT_STORE_MB", "512")),
            "pids": {},
        }
        token = self.dir / "ray_token"
        if not token.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            token.write_text(secrets.token_hex(32))
            os.chmod(token, 0o600)
        return state

    def client_env(self, state: dict) -> dict[str, str]:
        """What a client needs to use the stack: printed by `up` as `export` lines."""
        ports = state["ports"]
        return {
            "PREFECT_API_URL": f"http://{procs.LOOPBACK}:{ports['prefect']}/api",
            "MLFLOW_TRACKING_URI": f"http://{procs.LOOPBACK}:{ports['mlflow']}",
            "RAY_ADDRESS": f"{procs.LOOPBACK}:{ports['ray_gcs']}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.dir / "ray_token"),
            "MMFUSION_HOME": str(self.home),
        }

    def services(self, state: dict) -> list[Service]:
        builders = {"postgres": postgres_service, "ray-head": ray_head_service, "ray-worker": ray_worker_service,
                    "mlflow": mlflow_service, "prefect-server": prefect_server_service}
        out = [builders[name](state, self.dir) for name in ORDER[:-1]
               if not (name == "postgres" and state.get("external_postgres"))]
        return out + [prefect_worker_service(state, self.dir, self.client_env(state))]

    # queries -------------------------------------------------------------------------------
    def running(self, state: dict, name: str) -> bool:
        return _ours(state.get("pids", {}).get(name))

    def status(self) -> list[dict]:
        """One row per service: name, state (healthy / unhealthy / stopped), address, pid."""
        state = self.load()
        if not state:
            return [{"name": n, "state": "stopped", "address": "-", "pid": None} for n in ORDER]
        rows = []
        for svc in self.services(state):
            pid = state["pids"].get(svc.name, {}).get("pid")
            if not self.running(state, svc.name):
                rows.append({"name": svc.name, "state": "stopped", "address": svc.address, "pid": None})
                continue
            ok = procs.wait_until(svc.healthy, 0)
            rows.append({"name": svc.name, "state": "healthy" if ok else "unhealthy", "address": svc.address,
                         "pid": pid})
        return rows

    # up / down -----------------------------------------------------------------------------
    def up(self) -> dict[str, str]:
        """Start what is not running (in order, each healthy before the next); the client env."""
        state = self.load()
        if not any(self.running(state, n) for n in ORDER):
            self._sweep_ray_temp(state)
            state = self.fresh_state(state)
        elif self.postgres_url and self.postgres_url != state.get("external_postgres"):
            raise StackError("the stack already runs on another database; `mmfusion stack down` first")
        check_artifacts(state["artifacts"])
        self.save(state)
        if state["external_postgres"]:
            postgres.ensure_databases(state["postgres_url"])
        else:
            postgres.init_cluster(self.dir / "postgres", state["postgres_password"])
        for svc in self.services(state):
            self._up_one(state, svc)
        return self.client_env(state)

    def _up_one(self, state: dict, svc: Service) -> None:
        if self.running(state, svc.name):
            self.say(f"{svc.name:<15} already running (pid {state['pids'][svc.name]['pid']}) at {svc.address}")
            self._wait_healthy(svc, state["pids"][svc.name]["pid"])
            return
        if svc.port and procs.port_open(svc.port):
            raise StackError(f"{svc.name}: port {svc.port} on {procs.LOOPBACK} is taken by another process; "
                             "run `mmfusion stack down`, then `mmfusion stack up` picks free ports")
        log = self.dir / f"{svc.name}.log"
        started = time.monotonic()
        pid = procs.spawn(svc.argv, svc.env, log, cwd=svc.cwd, user=svc.user)
        procs.wait_until(lambda: procs.cmdline(pid) != "", 5, 0.05)
        state["pids"][svc.name] = {"pid": pid, "cmdline": procs.cmdline(pid), "log": str(log)}
        self.save(state)
        self.say(f"{svc.name:<15} starting (pid {pid}) at {svc.address}; log {log}")
        self._wait_healthy(svc, pid)
        self.say(f"{svc.name:<15} healthy after {time.monotonic() - started:.1f} s")
        if svc.name == "postgres":
            postgres.ensure_databases(state["postgres_url"])

    def _wait_healthy(self, svc: Service, pid: int) -> None:
        ok = procs.wait_until(lambda: svc.healthy() or not procs.alive(pid), svc.start_timeout_s)
        if ok and procs.alive(pid) and procs.wait_until(svc.healthy, 0):
            return
        log = self.dir / f"{svc.name}.log"
        why = "exited" if not procs.alive(pid) else f"did not answer within {svc.start_timeout_s:.0f} s"
        raise StackError(f"{svc.name} {why} (command: {' '.join(svc.argv[:3])} ...); its log {log} ends:\n"
                         f"{procs.log_tail(log)}\n`mmfusion stack down` stops what did start")

    def down(self) -> list[tuple[str, list[int]]]:
        """Stop, in reverse order, exactly what `up` started; returns (service, pids stopped)."""
        state = self.load()
        if not state:
            return []
        stopped = []
        for svc in reversed(self.services(state)):
            entry = state["pids"].pop(svc.name, None)
            if _ours(entry):
                started = time.monotonic()
                pids = procs.terminate(entry["pid"], sig=svc.stop_signal)
                stopped.append((svc.name, pids))
                self.say(f"{svc.name:<15} stopped ({len(pids)} processes, {time.monotonic() - started:.1f} s)")
            self.save(state)
        self._sweep_ray_temp(state)
        return stopped

    def _sweep_ray_temp(self, state: dict) -> None:
        """Stop any process left in the stack's Ray temp dir, then remove the dir."""
        temp = state.get("ray_temp")
        if temp and Path(temp).is_dir():
            procs.terminate(None, procs.pids_with(temp))
            shutil.rmtree(temp, ignore_errors=True)
