"""The registry fails closed, and registering is idempotent.

Real failures only: a tracking server on a closed port of 127.0.0.1, a real HTTP server that
answers every request with 503 (a flaky MLflow server), and MLflow on SQLite for the rest.
"""

from __future__ import annotations

import http.server
import socket
import sys
import threading
from pathlib import Path

import pytest

from pipelines.config import load_config
from pipelines.core.mlflow import RegistryError, champion_version, client
from pipelines.registry import champion_benchmark, list_models, register_and_gate, show
from pipelines.registry.register import register_version

sys.path.insert(0, str(Path(__file__).parent))
from registry_support import LINEAGE, hits, make_checkpoint, make_report  # noqa: E402


@pytest.fixture(autouse=True)
def fast_failing_http(monkeypatch):
    """MLflow's HTTP client: no retries, short timeouts, so a dead server fails in seconds."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def closed_port() -> int:
    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def flaky_server():
    """A real HTTP server on 127.0.0.1 that answers every request with 503."""

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def _fail(self):
            self.send_response(503)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"service unavailable")

        do_GET = do_POST = do_PATCH = do_DELETE = _fail

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def server_cfg(tmp_path, uri: str):
    return load_config("debug", [f"services.home={tmp_path / 'home'}", f"services.mlflow_tracking_uri={uri}"])


@pytest.fixture
def cfg(tmp_path):
    return load_config("debug", [f"services.home={tmp_path / 'home'}", "eval.bootstrap_samples=200"])


def test_an_unreachable_registry_is_an_error_not_no_champion(tmp_path):
    uri = f"http://127.0.0.1:{closed_port()}"
    cfg = server_cfg(tmp_path, uri)
    with pytest.raises(RegistryError, match=rf"MLflow at {uri} failed .*Nothing was promoted"):
        champion_version(client(cfg), cfg.registry.model_name)
    with pytest.raises(RegistryError, match=uri):
        champion_benchmark(cfg)  # the retrain flow's "is there a champion to re-evaluate?"


def test_a_flaky_server_is_an_error_not_no_champion(tmp_path, flaky_server):
    cfg = server_cfg(tmp_path, flaky_server)
    with pytest.raises(RegistryError, match=flaky_server):
        champion_version(client(cfg), cfg.registry.model_name)
    with pytest.raises(Exception) as err:  # registering promotes nothing on a failing registry
        register_and_gate(cfg, make_checkpoint(tmp_path, 1), make_report(tmp_path, hits(30)), LINEAGE)
    assert flaky_server in str(err.value)


def test_only_no_such_model_or_alias_means_no_champion(cfg, tmp_path):
    mlclient = client(cfg)
    name = cfg.registry.model_name
    assert champion_version(mlclient, name) is None  # no registered model at all
    mlclient.create_registered_model(name)
    assert champion_version(mlclient, name) is None  # a model without the alias
    first = register_and_gate(cfg, make_checkpoint(tmp_path, 1), make_report(tmp_path, hits(30)), LINEAGE)
    assert str(champion_version(mlclient, name).version) == first["version"]


def test_registering_the_same_checkpoint_twice_gives_one_version(cfg, tmp_path):
    ckpt = make_checkpoint(tmp_path, 1)
    report = make_report(tmp_path, hits(30))
    first = register_and_gate(cfg, ckpt, report, LINEAGE)
    again = register_and_gate(cfg, ckpt, report, LINEAGE)  # a retried `register` task
    assert again["version"] == first["version"] and again["champion_version"] == first["version"]
    assert again["promoted"] and "already the champion" in again["reason"]
    versions = list_models(cfg)[0]["versions"]
    assert [v["version"] for v in versions] == [first["version"]]
    assert show(cfg, cfg.registry.model_name)["tags"]["gate.reason"] == first["reason"]  # not overwritten


def test_a_retry_after_the_version_was_created_gates_that_version(cfg, tmp_path):
    """The first attempt created the version, then failed before the gate; the retry reuses it."""
    ckpt = make_checkpoint(tmp_path, 1)
    report = make_report(tmp_path, hits(30))
    created = register_version(cfg, ckpt, report, LINEAGE)
    res = register_and_gate(cfg, ckpt, report, LINEAGE)
    assert res["version"] == str(created.version) and res["promoted"]
    other = register_and_gate(cfg, make_checkpoint(tmp_path, 2), make_report(tmp_path, hits(20), tag="b"), LINEAGE)
    assert other["version"] != res["version"]  # other weights: a new version
    assert [v["version"] for v in list_models(cfg)[0]["versions"]] == [other["version"], res["version"]]
