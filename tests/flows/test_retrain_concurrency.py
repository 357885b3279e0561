"""One retrain per registered model at a time, on a real (test-harness) Prefect server.

Decision under test: a second retrain of the same model WAITS for the slot (so a manual run
after the nightly one is not lost), up to its `slot_timeout_s`, then fails with a clear
`RetrainBusyError`; a retrain of another model is not blocked. Tiny flows hold the slot through
the same helper the `retrain` flow uses; no training runs here.
"""

from __future__ import annotations

import threading
import time

import pytest


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def hold_slot(model_name: str, entered: threading.Event, release: threading.Event) -> threading.Thread:
    """A tiny flow, in a thread, that holds `model_name`'s retrain slot until `release` is set."""
    from prefect import flow

    from flows.retrain import one_retrain_per_model

    @flow(name="hold-retrain-slot")
    def holder(name: str) -> None:
        with one_retrain_per_model(name, timeout_s=30):
            entered.set()
            release.wait(timeout=60)

    thread = threading.Thread(target=holder, args=(model_name,), daemon=True)
    thread.start()
    assert entered.wait(timeout=60), "the first flow never got the slot"
    return thread


def test_a_second_retrain_of_the_same_model_waits_and_other_models_run(prefect_harness):
    from prefect import flow
    from prefect.client.orchestration import get_client

    from flows.retrain import RetrainBusyError, one_retrain_per_model, retrain_limit_name

    @flow(name="tiny-retrain")
    def tiny(name: str, timeout_s: float) -> float:
        start = time.monotonic()
        with one_retrain_per_model(name, timeout_s=timeout_s):
            return time.monotonic() - start

    entered, release = threading.Event(), threading.Event()
    first = hold_slot("model-a", entered, release)
    try:
        t0 = time.monotonic()
        with pytest.raises(RetrainBusyError, match="model-a.*mmfusion-retrain-model-a.*slot_timeout_s"):
            tiny("model-a", 2.0)
        assert time.monotonic() - t0 >= 2.0  # it waited for the slot before giving up
        assert tiny("model-b", 10.0) < 5.0  # another model is not blocked
    finally:
        release.set()
        first.join(timeout=60)
    assert tiny("model-a", 30.0) < 30.0  # the slot is free again once the first retrain ended

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(retrain_limit_name("model-a"))
    assert limit.limit == 1 and limit.active_slots == 0


def test_the_retrain_flow_takes_its_model_slot_before_any_work(prefect_harness, tmp_path, monkeypatch):
    """The real `retrain` flow refuses to start while its model's slot is held (here: fails after
    a 1 s wait, before preparing any data)."""
    from flows.retrain import RetrainBusyError, retrain

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    entered, release = threading.Event(), threading.Event()
    first = hold_slot("busy-model", entered, release)
    try:
        overrides = [f"services.home={tmp_path / 'home'}", "registry.model_name=busy-model"]
        with pytest.raises(RetrainBusyError, match="busy-model"):
            retrain(config="debug", overrides=overrides, slot_timeout_s=1.0)
    finally:
        release.set()
        first.join(timeout=60)
    assert not (tmp_path / "home" / "datasets").exists()  # no step ran
