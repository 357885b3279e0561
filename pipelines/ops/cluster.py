"""The Ray cluster's nodes and resources, for `mmfusion status`."""

from __future__ import annotations

from pipelines.config import Config, ray_address


def ray_nodes(cfg: Config) -> list[dict] | None:
    """Alive nodes of the configured Ray cluster (`RAY_ADDRESS`): address, head or not, CPU/GPU
    and memory; None when no cluster is configured (each command then starts its own Ray)."""
    address = ray_address(cfg)
    if not address:
        return None
    import logging

    import ray

    started = not ray.is_initialized()
    if started:  # a client only: no runtime env, no logs from the cluster's workers
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
    finally:
        if started:
            ray.shutdown()
    return [{"address": n["NodeManagerAddress"], "head": "node:__internal_head__" in n["Resources"],
             "cpu": n["Resources"].get("CPU", 0), "gpu": n["Resources"].get("GPU", 0),
             "memory_gb": n["Resources"].get("memory", 0) / 2**30} for n in nodes]
