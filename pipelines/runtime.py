"""Process set-up shared by every job: quiet offline services and a Ray connection."""

from __future__ import annotations

import logging
import os
import secrets

from pipelines.config import Config, ray_address

# Defaults for every job (a variable the user set wins). Telemetry and hub lookups off: this
# platform runs on closed networks, and their failed connections are noise in every log.
QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_TRAIN_V2_ENABLED": "1",  # Ray 2.60 default; resume-by-run-name needs V2
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_TELEMETRY": "false",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "GIT_PYTHON_REFRESH": "quiet",
    # Ray runs its workers at nice 15 by default; on a shared machine training then starves.
    "RAY_worker_niceness": "0",
}


LOCAL_DASHBOARD_HOST = "127.0.0.1"  # the in-process Ray's dashboard (when on): this machine only

STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")


def quiet_environment() -> None:
    """Set the quiet/offline variables (without overriding what the user set)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    quiet_loggers()


def quiet_loggers() -> None:
    """Chatty libraries at WARNING (also called in Ray workers, whose root logger is at INFO)."""
    for name in ("urllib3", "filelock", "httpx", "alembic", "mlflow.store.db.utils", "botocore", "aiobotocore", "s3fs"):
        logging.getLogger(name).setLevel(logging.WARNING)


def local_token_auth() -> None:
    """Token authentication for an in-process Ray, with a token of its own.

    Even with no dashboard, an in-process Ray's GCS, raylet and agents listen on every interface
    (`ss -ltnp`: `*:<port>`; `_node_ip_address="127.0.0.1"` does not change that), and whoever
    reaches those ports without auth can run code. Ray 2.60 turns token auth on by default for a
    new cluster, with a token in ~/.ray/auth_token made on first use; instead each in-process
    cluster gets a fresh token in RAY_AUTH_TOKEN, which its processes (and ours) inherit: no file
    that two first runs could write at once. A RAY_AUTH_MODE, RAY_AUTH_TOKEN or
    RAY_AUTH_TOKEN_PATH the user set is kept.
    """
    if os.environ.setdefault("RAY_AUTH_MODE", "token").lower() != "token":
        return
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    # Ray reads these variables into its cached config at import; re-read them (what Ray does
    # itself when it turns token auth on, `_enable_token_auth`).
    from ray._raylet import AuthenticationTokenLoader
    from ray._raylet import Config as RayConfig

    RayConfig.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def init_ray(cfg: Config | None = None, **kwargs):
    """Connect to the configured Ray cluster, or start a local one in-process.

    Idempotent: returns at once when Ray is already initialised (tests start their own).
    """
    import ray

    quiet_environment()
    if ray.is_initialized():
        return ray
    address = ray_address(cfg) if cfg is not None else os.environ.get("RAY_ADDRESS")
    if address:
        env_vars = {k: os.environ[k] for k in QUIET_ENV}
        # Where object storage is (not who may use it: credentials belong on the nodes, never in a
        # runtime env the dashboard shows).
        env_vars.update({k: os.environ[k] for k in STORAGE_ENV if k in os.environ})
        ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=True, **kwargs)
    else:
        local_token_auth()
        # One local node is never preempted: Ray Train's preemption watcher would be one more
        # actor (a few CPU-seconds of imports, then polling) taking CPU from training.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        num_cpus = cfg.services.ray_num_cpus if cfg is not None else None
        ray.init(
            # "local": a new in-process cluster even when `ray start` left one running on this
            # machine; with no address Ray would join that one (another user's, or a dead one).
            address="local",
            num_cpus=num_cpus,
            include_dashboard=kwargs.pop("include_dashboard", None),
            dashboard_host=kwargs.pop("dashboard_host", LOCAL_DASHBOARD_HOST),
            # No runtime env: the raylet this process starts, and the workers it starts, inherit
            # this process's environment (the quiet variables above, where object storage is).
            # A job with one gets no worker Ray prestarted, and waited ~0.8 s for new ones
            # before its first task ran (measured: 1.1 s after `ray.init` against 0.3 s).
            _temp_dir=kwargs.pop("_temp_dir", None),
            **kwargs,
        )
    return ray



def shutdown_ray() -> None:
    """`ray.shutdown()`, without its one-second wait on a local Ray's autoscaler monitor.

    Ray stops the GCS before the monitor, whose SIGTERM handler then reports its end to the dead
    GCS until Ray kills it a second later (1.0 of a 1.35 s shutdown, measured). An in-process
    Ray's monitor has nothing to stop cleanly, so it is killed first. A Ray this process only
    connected to is left running, as `ray.shutdown()` leaves it (it started no monitor here).
    """
    import ray
    from ray._private import worker

    node = worker._global_node  # the node this process started or connected to (None: neither)
    if node is not None:
        node.kill_monitor(check_alive=False)  # SIGKILL: it would only report its end
    ray.shutdown()
