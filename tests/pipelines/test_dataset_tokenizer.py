"""A dataset version carries its tokenizer: ingest trains it, training uses it.

- The real ingest (`tiny_dataset`) writes `<version>/tokenizer/`, each file listed with its sha256
  in the manifest, trained on the train split's texts.
- The training driver loads that tokenizer (nothing trained, nothing cached), and refuses a version
  whose tokenizer file was altered, naming the file.
- A version ingested before versions carried tokenizers still trains: the driver prints a notice,
  trains one on the train split once and reuses it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmcore.data import load_tokenizer
from pipelines.config import load_config
from pipelines.core.dataset import MANIFEST, TOKENIZER_DIR, read_manifest
from pipelines.core.storage import sha256_file
from pipelines.train import TrainingError
from pipelines.train.driver import dataset_tokenizer


def copy_version(version: Path, root: Path) -> Path:
    dest = root / version.name
    shutil.copytree(version, dest)
    return dest


def test_ingest_writes_the_tokenizer_with_its_sha256(tiny_dataset):
    entry = read_manifest(tiny_dataset)["tokenizer"]
    folder = tiny_dataset / TOKENIZER_DIR
    assert entry["path"] == TOKENIZER_DIR and "tokenizer.json" in entry["files"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(entry["files"])
    assert {name: sha256_file(folder / name) for name in entry["files"]} == entry["files"]
    tokenizer = load_tokenizer(folder)
    assert len(tokenizer) == entry["vocab_size"]
    # Trained on the shapes set's captions: its words are whole tokens.
    assert {"red", "circle", "square"} <= set(tokenizer.get_vocab())


def test_training_uses_the_versions_tokenizer(tiny_dataset, tmp_path, capsys):
    cfg = load_config("debug", [f"services.home={tmp_path}"])
    tokenizer = dataset_tokenizer(cfg, str(tiny_dataset))
    assert tokenizer.get_vocab() == load_tokenizer(tiny_dataset / TOKENIZER_DIR).get_vocab()
    assert not (tmp_path / "tokenizers").exists()  # nothing trained or copied for a local version
    assert "notice" not in capsys.readouterr().out


def test_an_altered_tokenizer_file_is_refused(tiny_dataset, tmp_path):
    version = copy_version(tiny_dataset, tmp_path / "data")
    with open(version / TOKENIZER_DIR / "tokenizer.json", "a") as f:
        f.write(" ")
    cfg = load_config("debug", [f"services.home={tmp_path / 'home'}"])
    with pytest.raises(TrainingError, match=r"tokenizer/tokenizer.json .*sha256.*Re-run the ingest"):
        dataset_tokenizer(cfg, str(version))


def test_a_version_without_tokenizer_trains_one_once_with_a_notice(tiny_dataset, tmp_path, capsys):
    version = copy_version(tiny_dataset, tmp_path / "data")
    shutil.rmtree(version / TOKENIZER_DIR)
    manifest = json.loads((version / MANIFEST).read_text())
    del manifest["tokenizer"]
    (version / MANIFEST).write_text(json.dumps(manifest))
    cfg = load_config("debug", [f"services.home={tmp_path / 'home'}", "model.vocab_size=200"])
    first = dataset_tokenizer(cfg, str(version))
    assert "notice: dataset version" in capsys.readouterr().out
    cached = tmp_path / "home" / "tokenizers" / f"{manifest['version']}-v200" / "tokenizer.json"
    stamp = cached.stat().st_mtime_ns
    second = dataset_tokenizer(cfg, str(version))
    assert second.get_vocab() == first.get_vocab() and len(first) <= 200
    assert cached.stat().st_mtime_ns == stamp  # loaded, not trained and written again
