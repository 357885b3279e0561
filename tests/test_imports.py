"""House rule 1: imports run one way, mmfusion (CLI) -> flows -> pipelines -> mmcore."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level modules it must never import
FORBIDDEN = {
    "mmcore": {"ray", "prefect", "mlflow", "webdataset", "pipelines", "flows", "mmfusion", "yaml"},
    "pipelines": {"flows", "prefect", "mmfusion"},
    "flows": {"mmfusion"},
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources found under {package}/"
    violations = [
        f"{f.relative_to(ROOT)} imports {name}"
        for f in files
        for name in sorted(imported_modules(f) & FORBIDDEN[package])
    ]
    assert not violations, "imports against the layering:\n" + "\n".join(violations)


def test_checker_sees_violations(tmp_path: Path) -> None:
    """The checker itself must catch both import forms, including ones inside functions."""
    f = tmp_path / "bad.py"
    f.write_text("import ray.data\n\ndef g():\n    from prefect import flow\n")
    assert imported_modules(f) == {"ray", "prefect"}
