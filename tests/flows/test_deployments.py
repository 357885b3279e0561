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
