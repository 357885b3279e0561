"""What a local Ray started by `init_ray` hands its workers."""

from __future__ import annotations

import os


def test_local_ray_workers_get_the_quiet_env_and_no_preemption_watcher(ray_local):
    @ray_local.remote(num_cpus=0)
    def worker_env(keys: list[str]) -> dict[str, str | None]:
        return {k: os.environ.get(k) for k in keys}

    env = ray_local.get(worker_env.remote(["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_V2_ENABLED",
                                           "MLFLOW_DISABLE_TELEMETRY"]))
    # One local node is never preempted: no watcher actor taking CPU from training.
    assert env == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_V2_ENABLED": "1",
                   "MLFLOW_DISABLE_TELEMETRY": "true"}


def test_a_local_ray_job_has_no_runtime_env(ray_local):
    """The local Ray's workers inherit the driver's environment (above), so its job needs no
    runtime env; with one, Ray's prestarted workers could not run its tasks and the first task
    waited for new ones (~0.8 s more on 2 cores)."""
    @ray_local.remote(num_cpus=0)
    def runtime_env() -> dict:
        return dict(ray_local.get_runtime_context().runtime_env)

    assert ray_local.get(runtime_env.remote()) == {}
