"""Shared fixtures: one real local Ray per test session, and a tiny ingested dataset version."""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")  # the shared test machine is slow

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    """Once pytest has reported everything and returned, end the process with its exit status,
    skipping interpreter finalisation.

    The session leaves native threads and handlers behind (Ray's gRPC clients, torch
    DataLoader's SIGCHLD handler, Arrow's S3 client, moto's server). Tearing them down in
    finalisation crashed the process once in six CI runs: a SIGSEGV after "156 passed", which
    made a green run fail. This exit runs first among the atexit handlers, after pytest's own
    clean-up. Set MMFUSION_TEST_NORMAL_EXIT=1 for a normal exit (to chase that crash:
    PYTHONFAULTHANDLER=1 prints where it happens).
    """
    if os.environ.get("MMFUSION_TEST_NORMAL_EXIT") != "1":
        atexit.register(_hard_exit, session)


def _hard_exit(session) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(session.exitstatus))


def _start_local_ray() -> None:
    from pipelines.config import load_config
    from pipelines.runtime import init_ray

    init_ray(load_config("debug", ["services.ray_num_cpus=2"]), include_dashboard=False)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray (2 CPUs, no dashboard), started once per session and shut down after."""
    import ray

    started = not ray.is_initialized()
    if started:
        _start_local_ray()
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server) on 127.0.0.1 for the rest of the session; yields its URL.

    The endpoint and dummy credentials go into the environment (AWS_ENDPOINT_URL and friends),
    where botocore (s3fs) and pyarrow's S3FileSystem both read them: the code under test gets
    `s3://` URIs and nothing else, as on real object storage.
    """
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: a free one
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("AWS_PROFILE", raising=False)
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url}.items():
            mp.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()  # none made before this point may be reused
        yield url
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture(scope="session")
def ray_s3(s3_server, ray_local):
    """The session's Ray, with workers that see the S3 endpoint. A Ray worker inherits the
    environment of the Ray that spawned it, so a Ray started before `s3_server` is restarted."""
    ray = ray_local

    @ray.remote(num_cpus=0)
    def worker_endpoint() -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL")

    if ray.get(worker_endpoint.remote()) != s3_server:
        ray.shutdown()
        _start_local_ray()
    return ray


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory) -> Path:
    """160 synthetic raw samples (seed 0) in the project's raw JSONL format."""
    from pipelines.ingest.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("synth") / "raw", num=160, seed=0)


@pytest.fixture(scope="session")
def tiny_dataset(ray_local, tiny_source, tmp_path_factory) -> Path:
    """The tiny source ingested with the `debug` data config; returns the version directory."""
    from pipelines.config import load_config
    from pipelines.ingest import ingest

    return ingest(tiny_source, tmp_path_factory.mktemp("datasets"), load_config("debug").data)


@pytest.fixture(scope="session")
def spoken_dataset(ray_local, tmp_path_factory) -> Path:
    """48 synthetic scenes with spoken captions and questions (espeak-ng), ingested with the
    `debug` data config; returns the version directory."""
    from pipelines.config import load_config
    from pipelines.ingest import ingest
    from pipelines.ingest.synth import synthesize

    raw = synthesize(tmp_path_factory.mktemp("spoken") / "raw", num=48, seed=0, audio=True)
    return ingest(raw, tmp_path_factory.mktemp("spoken-datasets"), load_config("debug").data)


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    """The real COCO photos at ../shared/data/coco-mini; skips where that folder is absent."""
    path = SHARED_DATA / "coco-mini"
    if not (path / "annotations").is_dir():
        pytest.skip(f"{path} not present (real COCO fixture lives outside the repository)")
    return path


@pytest.fixture(scope="session")
def make_untrained_checkpoint():
    """A factory `(data_dir, out_dir, seed=0, extra=None) -> Path`: an untrained debug model (32 px)
    with a tokenizer trained on the version's train split, saved as an mmcore checkpoint."""
    import torch

    from mmcore.checkpoint import save_checkpoint
    from mmcore.data import special_token_ids, train_tokenizer
    from mmcore.model import build_model, model_config
    from pipelines.core.dataset import sample_texts, shard_paths

    def make(data_dir, out_dir, seed: int = 0, extra: dict | None = None) -> Path:
        tok = train_tokenizer(sample_texts([str(u) for u in shard_paths(data_dir, "train")]), vocab_size=300)
        torch.manual_seed(seed)
        cfg = model_config("debug", vocab_size=len(tok), image_size=32, **special_token_ids(tok))
        return save_checkpoint(out_dir, build_model(cfg).eval(), tok, extra=extra)

    return make
