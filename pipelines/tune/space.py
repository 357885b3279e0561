"""The search space of `mmfusion tune`: parsed from `--search` / `--space`, checked against the
config schema before any trial starts, and applied to a config tree per trial.

A dimension is a dotted config key and a distribution:

    choice(a, b, c)        one of the values, drawn at random (values are YAML scalars)
    grid(a, b, c)          every value, each in its own trial (times --samples)
    uniform(lo, hi)        a float in [lo, hi]
    loguniform(lo, hi)     a float in [lo, hi], uniform in log space (lo > 0)
    randint(lo, hi)        an integer in lo..hi, both included

Keys are the YAML config's (`train.lr`); `model.overrides.<part>.<field>` reaches into the mmcore
model config (`model.overrides.fusion.num_layers`).
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipelines.config import Config, ConfigError

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
OVERRIDES = "model.overrides."
# What a trial must not change: its budget (ASHA's rungs are counted in validation reports), the
# dataset version every trial shares, its Ray resources and the services.
FIXED = ("train.steps", "train.finetune_steps", "train.eval_every", "data.", "scaling.", "services.")
_SPEC = re.compile(r"^\s*([a-z]+)\s*\((.*)\)\s*$", re.DOTALL)


@dataclass(frozen=True)
class Dimension:
    """One searched key: `kind` in KINDS, `args` the values (choice/grid) or the bounds."""

    key: str
    kind: str
    args: tuple[Any, ...]

    def candidates(self) -> tuple[Any, ...]:
        """Values that must all make a valid config: every option, or both bounds."""
        return self.args

    def describe(self) -> str:
        return f"{self.kind}({', '.join(str(a) for a in self.args)})"

    def to_tune(self):
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        return tune.randint(self.args[0], self.args[1] + 1)  # Tune's upper bound is exclusive


# ----------------------------------------------------------------------------- parsing


def parse_spec(key: str, spec: Any, where: str) -> Dimension:
    """`choice(1,2)` / `loguniform(1e-4, 1e-2)` / a YAML list (= choice) -> Dimension."""
    if isinstance(spec, list):
        return _checked(Dimension(key, "choice", tuple(spec)), where)
    match = _SPEC.match(str(spec))
    if not match or match.group(1) not in KINDS:
        raise ConfigError(
            f"{where}: cannot read {spec!r} as a distribution for {key}; write one of "
            "choice(a,b,...), grid(a,b,...), uniform(lo,hi), loguniform(lo,hi), randint(lo,hi)"
        )
    kind, inner = match.groups()
    try:
        args = yaml.safe_load(f"[{inner}]") or []
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: the values of {kind}({inner}) are not YAML scalars: {e}") from e
    return _checked(Dimension(key, kind, tuple(_number(a) for a in args)), where)


def _number(value: Any) -> Any:
    """YAML 1.1 reads `1e-4` as a string; a search space means the number."""
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _checked(dim: Dimension, where: str) -> Dimension:
    """Arity and bounds: choice/grid need values; ranges two numbers lo < hi (lo > 0 for log)."""
    if dim.kind in ("choice", "grid"):
        if not dim.args:
            raise ConfigError(f"{where}: {dim.kind}() for {dim.key} has no values; give at least one")
        return dim
    lo_hi = len(dim.args) == 2 and all(isinstance(a, int | float) and not isinstance(a, bool) for a in dim.args)
    if not lo_hi or dim.args[0] >= dim.args[1]:
        raise ConfigError(f"{where}: {dim.describe()} for {dim.key} needs two numbers lo < hi, "
                          f"e.g. {dim.kind}(1, 4)")
    if dim.kind == "loguniform" and dim.args[0] <= 0:
        raise ConfigError(f"{where}: {dim.describe()} for {dim.key} needs lo > 0 (log scale); "
                          "use uniform(0, hi) to include zero")
    if dim.kind == "randint" and not all(isinstance(a, int) for a in dim.args):
        raise ConfigError(f"{where}: {dim.describe()} for {dim.key} needs integer bounds")
    return dim


def parse_search_args(items: list[str]) -> list[Dimension]:
    """Repeated `--search dotted.key=distribution`."""
    dims = []
    for item in items:
        key, sep, spec = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad --search {item!r}: expected dotted.key=distribution, "
                              "e.g. --search 'train.lr=loguniform(1e-4,1e-2)'")
        dims.append(parse_spec(key.strip(), spec, f"--search {item}"))
    return dims


def load_space_file(path: str | Path) -> list[Dimension]:
    """A YAML mapping of dotted keys (or nested sections) to distributions or lists."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--space {path}: no such file; pass a YAML file mapping keys to distributions")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--space {path}: not valid YAML: {e}") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"--space {path}: the top level must map keys to distributions, "
                          "e.g. 'train.lr: loguniform(1e-4, 1e-2)'")
    return [parse_spec(k, v, f"--space {path}") for k, v in _flatten(tree)]


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, f"{dotted}.")
        else:
            yield dotted, value


def default_space(cfg: Config) -> list[Dimension]:
    """Learning rate, warm-up, the ITM and LM loss weights and the fusion depth."""
    steps = cfg.train.steps
    warmups = sorted({0, max(1, steps // 10), max(1, steps // 4)})
    specs = {"train.lr": "loguniform(2e-4, 3e-3)", "train.warmup_steps": f"choice({', '.join(map(str, warmups))})",
             "train.itm_weight": "loguniform(0.3, 3.0)", "train.lm_weight": "loguniform(0.3, 3.0)",
             "model.overrides.fusion.num_layers": "choice(1, 2)"}
    return [parse_spec(k, v, "the default space") for k, v in specs.items()]


# ----------------------------------------------------------------------------- applying + checking


def set_value(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key in a config tree; under `model.overrides` the rest is one mmcore key."""
    if key.startswith(OVERRIDES):
        tree.setdefault("model", {}).setdefault("overrides", {})[key[len(OVERRIDES):]] = value
        return
    *sections, last = key.split(".")
    node = tree
    for part in sections:
        node = node.setdefault(part, {})
    node[last] = value


def apply_values(base: dict[str, Any], values: dict[str, Any]) -> Config:
    """The base config tree with these dotted values, validated."""
    tree = copy.deepcopy(base)
    for key, value in values.items():
        set_value(tree, key, value)
    return Config.model_validate(tree)


def check_space(base: Config, dims: list[Dimension]) -> None:
    """Every key exists and may be searched, and every candidate value makes a valid config."""
    if not dims:
        raise ConfigError("the search space is empty; pass --search KEY=DIST or --space FILE")
    seen = set()
    for dim in dims:
        if dim.key in seen:
            raise ConfigError(f"{dim.key} is searched twice; keep one distribution for it")
        seen.add(dim.key)
        check_key(dim.key)
        for value in dim.candidates():
            check_value(base, dim, value)


def check_key(key: str) -> None:
    fixed = next((f for f in FIXED if key == f or (f.endswith(".") and key.startswith(f))), None)
    if fixed:
        raise ConfigError(
            f"{key} cannot be searched: every trial shares the budget (train.steps, "
            "train.finetune_steps, train.eval_every), the dataset version, scaling and services. "
            "Set them for all trials with --set instead."
        )
    if key.startswith(OVERRIDES):
        return  # checked against mmcore's model config with the values (check_value)
    parts = key.split(".")
    model: type[BaseModel] = Config
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "the config"
            near = difflib.get_close_matches(part, list(fields), n=1)
            hint = f"; did you mean {'.'.join([*parts[:i], near[0]])}?" if near else ""
            raise ConfigError(f"unknown config key {key!r}: {where} has no {part!r}{hint} "
                              f"(keys there: {', '.join(fields)}; see pipelines/config.py)")
        annotation = fields[part].annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        last = i == len(parts) - 1
        if is_section and last:
            raise ConfigError(f"{key!r} is a whole section; search one of its keys, "
                              f"e.g. {key}.{next(iter(annotation.model_fields))}")
        if not is_section and not last:
            raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        if is_section:
            model = annotation


def check_value(base: Config, dim: Dimension, value: Any) -> None:
    try:
        cfg = apply_values(base.to_dict(), {dim.key: value})
    except ValidationError as e:
        detail = "; ".join(err["msg"] for err in e.errors())
        raise ConfigError(f"{dim.key}={value!r} (from {dim.describe()}) is not a valid value: {detail}") from e
    if dim.key.startswith(OVERRIDES):
        from mmcore.model import model_config

        try:
            model_config(cfg.model.preset, **cfg.model.overrides)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{dim.key}: {e} (the part after model.overrides. is a key of "
                              "mmcore's FusionModelConfig, e.g. fusion.num_layers)") from e
