"""While a local Ray starts, the driver cleans the first inputs itself (`driver._HeadStart`), and
Ray the rest: the version is the one an ingest on a running Ray makes, byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]

# In a process of its own, as a user runs it: Ray is not up yet (the session's `ray_local` is).
SCRIPT = textwrap.dedent("""
    import sys
    from pipelines.ingest import driver
    driver.HEAD_MOST = 64  # the driver takes at most 64 of the 160 inputs: Ray cleans the others
    from mmfusion.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _files(vdir: Path) -> dict[str, str]:
    """Every file of a version by its sha256, the manifest without its creation time."""
    out = {}
    for path in sorted(p for p in vdir.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "manifest.json":
            manifest = json.loads(data)
            manifest.pop("created")
            data = json.dumps(manifest, sort_keys=True).encode()
        out[str(path.relative_to(vdir))] = hashlib.sha256(data).hexdigest()
    return out


def test_the_driver_cleans_while_ray_starts_and_the_version_is_the_same(tiny_source, tiny_dataset, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    run = subprocess.run([sys.executable, "-c", SCRIPT, "data", "ingest", "--config", "debug", "--source",
                          str(tiny_source), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=200)
    assert run.returncode == 0, run.stderr[-3000:]
    took = [line for line in run.stderr.splitlines() if "the driver took" in line]
    assert took, run.stderr[-3000:]
    assert 0 < int(took[0].split("the driver took ")[1].split()[0]) <= 64, took
    vdir = Path(run.stdout.strip().splitlines()[-1])
    assert vdir.name == Path(tiny_dataset).name  # the same content id
    assert _files(vdir) == _files(Path(tiny_dataset))  # shards, rejects, report, tokenizer, manifest
