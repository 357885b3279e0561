"""Hyperparameter search on Ray Tune: `run_search(cfg, SearchSpec(...)) -> SearchResult`."""

from pipelines.tune.search import SearchResult, SearchSpec, best_config_yaml, results_table, run_search
from pipelines.tune.space import Dimension, default_space, load_space_file, parse_search_args

__all__ = ["Dimension", "SearchResult", "SearchSpec", "best_config_yaml", "default_space", "load_space_file",
           "parse_search_args", "results_table", "run_search"]
