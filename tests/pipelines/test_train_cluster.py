"""A training job across two Ray nodes (`ray.cluster_utils.Cluster`, one CPU each).

Runs in a subprocess: the cluster needs its own Ray driver, and this session already holds one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(900)

SCRIPT = textwrap.dedent("""
    import json, sys
    from pipelines.runtime import quiet_environment
    quiet_environment()  # before Ray starts: the nodes' workers inherit these variables
    import ray
    from ray.cluster_utils import Cluster
    from pipelines.config import load_config
    from pipelines.train import read_trainer_state, run_training

    data, home = sys.argv[1], sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    cfg = load_config("debug", [f"services.home={home}", "train.steps=4", "train.checkpoint_every=2",
                                "train.batch_size=8", "train.log_every=2", "train.eval_every=0",
                                "train.loader_workers=0", "train.val_max_samples=8",
                                "scaling.num_workers=2", "scaling.cpus_per_worker=1"])
    try:
        path = run_training(cfg, data, "pretrain", run_name="two-nodes")
        state = read_trainer_state(path)
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        print("RESULT " + json.dumps({"ranks": state["ranks"], "step": state["step"], "nodes": sorted(nodes)}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def test_training_spans_two_nodes(tiny_dataset, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_dataset), str(tmp_path)],
                          capture_output=True, text=True, timeout=840, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert len(result["nodes"]) == 2
    assert result["step"] == 4
    assert all(r["step"] == 4 for r in result["ranks"])
    # One worker per node: each node has one CPU and each worker needs one.
    assert {r["node_id"] for r in result["ranks"]} == set(result["nodes"])
