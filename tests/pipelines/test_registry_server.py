"""Once through a real `mlflow server` on 127.0.0.1 (free port), started here and killed at the end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipelines.config import load_config
from pipelines.registry import register_and_gate, resolve_model, show

sys.path.insert(0, str(Path(__file__).parent))
from registry_support import LINEAGE, hits, make_checkpoint, make_report  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "server-artifacts")]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {(tmp_path / 'server.log').read_text()[-2000:]}")
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("mlflow server did not answer /health within 120 s")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (gunicorn/uvicorn workers)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_register_gate_and_resolve_through_a_server(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("debug", [f"services.home={tmp_path / 'home'}", f"services.mlflow_tracking_uri={mlflow_server}",
                                "eval.bootstrap_samples=200"])
    a = register_and_gate(cfg, make_checkpoint(tmp_path, 1), make_report(tmp_path, hits(30), tag="a"), LINEAGE)
    ckpt = make_checkpoint(tmp_path, 2)
    b = register_and_gate(cfg, ckpt, make_report(tmp_path, hits(60), tag="b"), LINEAGE)
    assert a["promoted"] and b["promoted"] and b["champion_version"] == b["version"]
    assert show(cfg, cfg.registry.model_name)["tags"]["previous_champion"] == a["version"]
    local = resolve_model(cfg, f"models:/{cfg.registry.model_name}@champion")
    assert (local / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    assert (tmp_path / "server-artifacts").is_dir() and not (tmp_path / "mlruns").exists()
