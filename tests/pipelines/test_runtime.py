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
