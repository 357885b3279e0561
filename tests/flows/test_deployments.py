"""The nightly deployment registers with a real (test-harness) Prefect server, schedule included."""

from __future__ import annotations

import asyncio

import pytest


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_retrain_deployment_applies_with_schedule(prefect_harness):
    from prefect.client.orchestration import get_client

    from flows.deployments import retrain_deployment

    deployment = retrain_deployment("nightly-test", "debug", ["train.steps=5"], "0 2 * * *")
    deployment_id = deployment.apply()

    async def read():
        async with get_client() as client:
            return await client.read_deployment(deployment_id)

    stored = asyncio.run(read())
    assert stored.name == "nightly-test"
    assert stored.parameters == {"config": "debug", "overrides": ["train.steps=5"]}
    crons = [s.schedule.cron for s in stored.schedules]
    assert crons == ["0 2 * * *"]


def test_deploy_to_pool_makes_retrain_and_a_typed_ingest_run_from_this_checkout(prefect_harness, tmp_path):
    """`mmfusion deploy`'s deployments: on pool `mmfusion`, code pulled from this checkout (no
    image), the config as an absolute path, a schedule only when asked, ingest's format a choice."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.deployments import ROOT, WORK_POOL, deploy_to_pool

    async def make_pool():
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name=WORK_POOL, type="process"), overwrite=True)

    asyncio.run(make_pool())
    ids = deploy_to_pool("smoke-test", "configs/debug.yaml", ["train.steps=5"], None)
    assert sorted(ids) == ["ingest/smoke-test", "retrain/smoke-test"]

    async def read(name):
        async with get_client() as client:
            return await client.read_deployment_by_name(name)

    retrain, ingest = asyncio.run(read("retrain/smoke-test")), asyncio.run(read("ingest/smoke-test"))
    config = str(ROOT / "configs" / "debug.yaml")
    assert retrain.work_pool_name == ingest.work_pool_name == WORK_POOL
    assert retrain.parameters == {"config": config, "overrides": ["train.steps=5"]}
    assert retrain.schedules == []  # triggered only, without --cron
    assert retrain.entrypoint == "flows/retrain.py:retrain" and ingest.entrypoint == "flows/ingest.py:ingest"
    for dep in (retrain, ingest):
        assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    schema = ingest.parameter_openapi_schema
    assert schema["required"] == ["source"]
    assert "webdataset" in str(schema["properties"]["format"]) + str(schema.get("definitions"))
    again = deploy_to_pool("smoke-test", "configs/debug.yaml", [], "0 3 * * *")  # an update, not a copy
    assert again == ids
    assert [s.schedule.cron for s in asyncio.run(read("retrain/smoke-test")).schedules] == ["0 3 * * *"]
