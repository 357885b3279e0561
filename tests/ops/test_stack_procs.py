"""The stack's process handling and its refusals, on real processes (seconds; no servers)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines.ops import procs
from pipelines.ops.services import StackError

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
MMFUSION = [sys.executable, "-m", "mmfusion.cli"]

# A leader that starts a child in a process group of its own (as Ray's actors do), which starts
# a grandchild; each writes its pid and sleeps.
TREE = textwrap.dedent("""
    import os, subprocess, sys, time
    out = sys.argv[1]
    if len(sys.argv) == 2:
        subprocess.Popen([sys.executable, __file__, out, "child"], preexec_fn=os.setpgrp)
    elif sys.argv[2] == "child":
        subprocess.Popen([sys.executable, __file__, out, "grandchild"])
    open(os.path.join(out, str(os.getpid())), "w").close()
    time.sleep(300)
""")


def test_terminate_stops_the_whole_session_and_nothing_else(tmp_path: Path):
    script = tmp_path / "tree.py"
    script.write_text(TREE)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    leader = procs.spawn([sys.executable, str(script), str(tmp_path)], dict(os.environ), tmp_path / "tree.log")
    try:
        assert procs.wait_until(lambda: len([p for p in tmp_path.iterdir() if p.name.isdigit()]) == 3, 30)
        tree = sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit())
        assert leader in tree and all(procs.alive(p) for p in tree)
        # the child left the leader's process group: a killpg alone would miss it
        assert any(os.getpgid(p) != leader for p in tree)
        stopped = procs.terminate(leader, timeout_s=10)
        assert set(tree) <= set(stopped)
        assert not any(procs.alive(p) for p in tree)
        assert procs.alive(bystander.pid) and bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait(timeout=10)
        for p in tmp_path.iterdir():
            if p.name.isdigit() and procs.alive(int(p.name)):
                os.kill(int(p.name), 9)


def test_pids_with_finds_a_process_by_a_string_in_its_command_line(tmp_path: Path):
    marker = str(tmp_path / "marker-dir")
    proc = subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(300)", marker])
    try:
        assert procs.wait_until(lambda: proc.pid in procs.pids_with(marker), 10)
        assert procs.pids_with(marker + "-other") == []
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.skipif(os.geteuid() != 0, reason="the postgres user's reach matters only when we run as root")
def test_up_in_a_private_home_names_the_directory_and_the_fix(tmp_path: Path):
    """As root, PostgreSQL runs as `postgres`, which cannot enter a mode-700 directory."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    home = private / "home"
    env = {**os.environ, "MMFUSION_HOME": str(home)}
    done = subprocess.run([*MMFUSION, "stack", "up"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=100)
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""  # no export lines for a stack that did not start
    assert "cannot reach" in done.stderr and str(home / "stack" / "postgres") in done.stderr
    assert "MMFUSION_HOME" in done.stderr and "--postgres URL" in done.stderr
    status = subprocess.run([*MMFUSION, "stack", "status"], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=100)
    assert status.returncode == 1 and "postgres" in status.stdout and "stopped" in status.stdout


def test_a_missing_tool_names_it_and_the_fix(monkeypatch):
    from pipelines.ops import services

    monkeypatch.setattr(sys, "executable", "/nonexistent/bin/python")
    with pytest.raises(StackError, match=r"`mlflow` is not installed next to /nonexistent/bin/python: run `pip install -e \.`"):
        services.tool("mlflow")


def test_deploy_without_a_prefect_server_says_how_to_get_one(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["MMFUSION_HOME"] = str(tmp_path)
    done = subprocess.run([*MMFUSION, "deploy", "--config", "configs/debug.yaml"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=100)
    assert done.returncode == 2
    assert "PREFECT_API_URL" in done.stderr and "mmfusion stack up" in done.stderr
