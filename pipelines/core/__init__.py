"""The contracts the jobs share: storage, the dataset version, checkpoint files, MLflow, records.

`ingest`, `train`, `evaluate`, `serve`, `registry` and `flows` import `pipelines.core`; it
imports none of them (`tests/test_imports.py` holds the ranks).
"""
