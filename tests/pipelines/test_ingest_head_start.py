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


def _cli_ingest(source: Path, out: Path, *sets: str) -> tuple[Path, int]:
    """`mmfusion data ingest --config debug` in a process of its own: (version, inputs the driver took)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    run = subprocess.run([sys.executable, "-c", SCRIPT, "data", "ingest", "--config", "debug", "--source", str(source),
                          "--out", str(out), *[a for s in sets for a in ("--set", s)]],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=200)
    assert run.returncode == 0, run.stderr[-3000:]
    took = [line for line in run.stderr.splitlines() if "the driver took" in line]
    assert took, run.stderr[-3000:]
    return Path(run.stdout.strip().splitlines()[-1]), int(took[0].split("the driver took ")[1].split()[0])


def test_the_driver_cleans_while_ray_starts_and_the_version_is_the_same(tiny_source, tiny_dataset, tmp_path):
    vdir, took = _cli_ingest(tiny_source, tmp_path / "out")
    assert 0 < took <= 64
    assert vdir.name == Path(tiny_dataset).name  # the same content id
    assert _files(vdir) == _files(Path(tiny_dataset))  # shards, rejects, report, tokenizer, manifest


def test_a_url_list_gives_the_same_version_with_the_driver_downloading_while_ray_starts(ray_local, tmp_path):
    """The same for a URL list (one download pool on the driver, streams on Ray): the same rows,
    rejects (404, HTML) and merged duplicates (24 photos under 144 URLs), and every URL downloaded once."""
    from ingest_web_server import WebServer, distinct_jpegs

    from pipelines.config import load_config
    from pipelines.ingest import ingest

    sets = ("data.allow_private_urls=true", "data.http_retries=0")
    with WebServer(distinct_jpegs(24), latency=0.05) as srv:
        urls = [srv.url(f"/img/{i}.jpg") if i % 10 else srv.url(f"/{('missing', 'html')[i % 20 // 10]}/{i}.jpg")
                for i in range(160)]
        (tmp_path / "urls.csv").write_text("url,caption\n" + "".join(f"{u},a photo of shapes {i}\n" for i, u in enumerate(urls)))
        before = srv.stats.total()
        vdir, took = _cli_ingest(tmp_path / "urls.csv", tmp_path / "out", *sets)
        assert srv.stats.total() - before == 160  # each URL once, whoever fetched it
        expected = ingest(tmp_path / "urls.csv", tmp_path / "running-ray", load_config("debug", list(sets)).data)
    assert 0 < took <= 64
    assert vdir.name == Path(expected).name
    assert _files(vdir) == _files(Path(expected))
