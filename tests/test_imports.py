"""House rule 1: imports run one way, and the project's modules import no cycle.

An allowlist with ranks: a module may import its own package and the packages ranked below it,
nothing else of the project. Imports inside functions (and under `TYPE_CHECKING`) count: a lazy
import is still a dependency. `bench/` and the CLI (`mmfusion/`) are covered like the rest.
On top of the ranks, the jobs `PEER_JOBS` (train, evaluate, serve, registry) import none of each
other, even downward: they meet in `pipelines.core`.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A layer is a module prefix; a module belongs to the longest layer that prefixes it.
RANKS = (
    "mmcore",
    "pipelines.config",
    "pipelines.runtime",
    "pipelines.core",
    "pipelines.ingest",
    "pipelines.train",
    "pipelines.evaluate",
    "pipelines.serve",
    "pipelines.registry",
    "pipelines.tune",
    "pipelines.ops",
    "flows",
    "mmfusion",
    "bench",
)
TOP_LEVEL = ("mmcore", "pipelines", "flows", "mmfusion", "bench")

# The jobs that meet only in `pipelines.core`: none imports another, though the ranks would let a
# higher one import a lower (the registry's gate once imported evaluation; training imported the
# registry). Ingest is below them all and not one of them: evaluation reads the synthetic set's
# scene objects from `pipelines.ingest.synth`, serving cleans audio with `pipelines.ingest.audioclean`.
PEER_JOBS = ("pipelines.train", "pipelines.evaluate", "pipelines.serve", "pipelines.registry")

# Third-party packages each layer may not import (mmcore: only what the allowlist below names).
MMCORE_THIRD_PARTY = {"torch", "torchvision", "transformers", "tokenizers", "safetensors", "PIL", "numpy"}
FORBIDDEN = {"pipelines": {"prefect"}}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(root: Path, path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file, as absolute dotted names. `from a import b`
    names `a.b` when `b` is a module of the project, else `a`."""
    name = module_name(root, path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if _is_module(root, sub) else base)
    return out


def _is_module(root: Path, dotted: str) -> bool:
    rel = Path(*dotted.split("."))
    return (root / rel).with_suffix(".py").is_file() or (root / rel / "__init__.py").is_file()


def layer_of(module: str) -> str | None:
    found = [r for r in RANKS if module == r or module.startswith(r + ".")]
    return max(found, key=len) if found else None


def sources(root: Path) -> list[Path]:
    return sorted(p for top in TOP_LEVEL if (root / top).is_dir() for p in (root / top).rglob("*.py"))


def layered_imports(root: Path):
    """`(path, imported module, importer's layer, imported layer)` for every import between two
    ranked layers (imports within a layer or of an unranked module are left out)."""
    for path in sources(root):
        mine = layer_of(module_name(root, path))
        for target in sorted(imports_of(root, path)):
            theirs = layer_of(target)
            if mine is not None and theirs is not None and theirs != mine:
                yield path, target, mine, theirs


def rank_violations(root: Path) -> list[str]:
    """`file imports module (layer a may not import layer b)` for every import against the ranks."""
    return [f"{path.relative_to(root)} imports {target} ({mine} may not import {theirs})"
            for path, target, mine, theirs in layered_imports(root) if RANKS.index(theirs) > RANKS.index(mine)]


def peer_violations(root: Path) -> list[str]:
    """`file imports module (a may not import b: ...)` for every import between two `PEER_JOBS`."""
    return [f"{path.relative_to(root)} imports {target} ({mine} may not import {theirs}: the jobs meet in pipelines.core)"
            for path, target, mine, theirs in layered_imports(root) if mine in PEER_JOBS and theirs in PEER_JOBS]


def third_party_violations(root: Path) -> list[str]:
    out = []
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for path in sources(root):
        mine = module_name(root, path).split(".")[0]
        for target in sorted(imports_of(root, path)):
            top = target.split(".")[0]
            if top in TOP_LEVEL or top in stdlib:
                continue
            if (mine == "mmcore" and top not in MMCORE_THIRD_PARTY) or top in FORBIDDEN.get(mine, ()):
                out.append(f"{path.relative_to(root)} imports {target}")
    return out


def import_cycles(root: Path) -> list[list[str]]:
    """Cycles among the project's own modules (a package's `__init__` is the package's module)."""
    graph: dict[str, set[str]] = {}
    for path in sources(root):
        mods = {t for t in imports_of(root, path) if t.split(".")[0] in TOP_LEVEL and _is_module(root, t)}
        graph[module_name(root, path)] = mods - {module_name(root, path)}
    cycles, done, stack = [], set(), []

    def visit(node: str) -> None:
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in stack:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in done:
                visit(nxt)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node)
    return cycles


def test_every_module_has_a_rank():
    unranked = [str(p.relative_to(ROOT)) for p in sources(ROOT) if layer_of(module_name(ROOT, p)) is None]
    # `pipelines/__init__.py` is the namespace itself; everything else must sit in a layer.
    assert unranked == ["pipelines/__init__.py"]


def test_imports_follow_the_ranks():
    violations = rank_violations(ROOT)
    assert not violations, "imports against the ranks:\n" + "\n".join(violations)


def test_train_evaluate_serve_and_registry_import_none_of_each_other():
    violations = peer_violations(ROOT)
    assert not violations, "imports between jobs:\n" + "\n".join(violations)


def test_third_party_imports_stay_in_their_layer():
    violations = third_party_violations(ROOT)
    assert not violations, "third-party imports against the layering:\n" + "\n".join(violations)


def test_no_import_cycles():
    cycles = import_cycles(ROOT)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A tiny tree shaped like the project, with nothing wrong in it yet."""
    for pkg in ("mmcore", "pipelines", "pipelines/core", "pipelines/train", "pipelines/registry"):
        (tmp_path / pkg).mkdir(parents=True, exist_ok=True)
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "mmcore" / "model.py").write_text("import torch\n")
    (tmp_path / "pipelines" / "core" / "files.py").write_text("import json\n")
    (tmp_path / "pipelines" / "train" / "loop.py").write_text("from pipelines.core import files\n")
    (tmp_path / "pipelines" / "registry" / "gate.py").write_text("from pipelines.core.files import x\n")
    return tmp_path


def test_the_checker_passes_a_clean_tree(planted: Path):
    assert rank_violations(planted) == [] and import_cycles(planted) == []
    assert third_party_violations(planted) == [] and peer_violations(planted) == []


def test_the_checker_catches_a_downward_import_between_jobs(planted: Path):
    """The ranks allow it (registry is above train); the peer rule does not, lazy or not."""
    (planted / "pipelines" / "registry" / "register.py").write_text(
        "def f():\n    from pipelines.train import loop\n"
    )
    assert rank_violations(planted) == []
    assert peer_violations(planted) == [
        "pipelines/registry/register.py imports pipelines.train.loop "
        "(pipelines.registry may not import pipelines.train: the jobs meet in pipelines.core)"
    ]


def test_the_checker_catches_an_upward_import_inside_a_function(planted: Path):
    (planted / "pipelines" / "train" / "driver.py").write_text(
        "def f():\n    from pipelines.registry import gate\n"
    )
    assert rank_violations(planted) == [
        "pipelines/train/driver.py imports pipelines.registry.gate "
        "(pipelines.train may not import pipelines.registry)"
    ]


def test_the_checker_catches_a_lazy_cycle_inside_one_package(planted: Path):
    (planted / "pipelines" / "core" / "a.py").write_text("from pipelines.core import b\n")
    (planted / "pipelines" / "core" / "b.py").write_text("def g():\n    from . import a\n")
    assert import_cycles(planted) == [["pipelines.core.a", "pipelines.core.b", "pipelines.core.a"]]


def test_the_checker_catches_a_forbidden_third_party_import(planted: Path):
    (planted / "mmcore" / "bad.py").write_text("def g():\n    import ray.data\n")
    (planted / "pipelines" / "core" / "bad.py").write_text("from prefect import flow\n")
    assert third_party_violations(planted) == ["mmcore/bad.py imports ray.data",
                                               "pipelines/core/bad.py imports prefect"]


def test_ingest_and_its_tokenizer_import_no_torch():
    """An ingest command parses shards and trains the version's tokenizer. `import mmcore.data`
    used to take ~3 s on 2 cores (torch, torchvision, AutoTokenizer); these imports take ~1 s.
    (Reading the shards back through webdataset still imports torch: webdataset's own doing.)"""
    import subprocess

    code = ("import sys\n"
            "import pipelines.ingest.driver, pipelines.ingest.stage, pipelines.core.dataset\n"
            "from mmcore.data import train_tokenizer, parse_sample, decode_text\n"
            "tok = train_tokenizer(['a red square', 'a blue circle'], 40)\n"
            "assert decode_text(tok, [tok('a red square')['input_ids'][1:]]) == ['a red square']\n"
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_the_cli_parser_imports_no_heavy_package():
    """`mmfusion --help` builds every subcommand's parser; the commands import torch, Ray, MLflow
    and Prefect only when they run (`train finetune --task`'s choices come from the torch-free
    `mmcore.tasks`)."""
    import subprocess

    code = ("import sys\n"
            "from mmfusion.cli import build_parser\n"
            "build_parser()\n"
            "heavy = ('torch', 'torchvision', 'transformers', 'ray', 'mlflow', 'prefect')\n"
            "print(sorted(m for m in heavy if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_mmcore_data_names_load_on_first_use():
    import mmcore.data

    assert set(mmcore.data.__all__) <= set(dir(mmcore.data))
    for name in mmcore.data.__all__:
        assert getattr(mmcore.data, name) is not None, name
    with pytest.raises(AttributeError, match="no_such_name"):
        mmcore.data.no_such_name  # noqa: B018
