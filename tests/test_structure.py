"""House rule: no function over 50 lines in `mmcore`, `pipelines`, `flows` or the CLI.

A long function is where a second job hides (the old 587-line training loop held steps, resume,
telemetry and fault injection); at 50 lines it must be split into named parts.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mmcore", "pipelines", "flows", "mmfusion")
MAX_LINES = 50


def long_functions(source: str, name: str) -> list[str]:
    """`"file:line name (N lines)"` for each function or method longer than MAX_LINES."""
    found = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_LINES:
                found.append(f"{name}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_over_50_lines():
    found = [f for pkg in PACKAGES for path in sorted((ROOT / pkg).rglob("*.py"))
             for f in long_functions(path.read_text(), str(path.relative_to(ROOT)))]
    assert not found, "split these functions (house rule: at most 50 lines):\n" + "\n".join(found)


def test_the_rule_catches_a_long_function_and_a_long_method():
    body = "".join(f"    x{i} = {i}\n" for i in range(50))
    planted = f"def short():\n    return 1\n\n\ndef long():\n{body}\n\nclass C:\n    def method(self):\n{body.replace('    ', '        ')}"
    assert long_functions(planted, "planted.py") == ["planted.py:5 long (51 lines)", "planted.py:59 method (51 lines)"]
