"""CLI end to end on a real tiny checkpoint: eval, registry round trip, caption / answer / retrieve."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch
from PIL import Image

from mmfusion.commands import evaluate as eval_cmd
from mmfusion.commands import infer as infer_cmd
from mmfusion.commands import registry as registry_cmd


def cli(argv: list[str]) -> int:
    """Only this area's subcommands (the full CLI lives in mmfusion/cli.py)."""
    parser = argparse.ArgumentParser(prog="mmfusion")
    sub = parser.add_subparsers(dest="command")
    for module in (eval_cmd, registry_cmd, infer_cmd):
        module.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def tiny_checkpoint(make_untrained_checkpoint):
    return lambda data_dir, out_dir, seed: make_untrained_checkpoint(data_dir, out_dir, seed, {"seed": seed})


@pytest.fixture
def opts(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    torch.set_num_threads(1)
    return ["--config", "debug", "--set", f"services.home={tmp_path / 'home'}", "--set", "eval.max_len=6",
            "--set", "eval.parallel=local", "--set", "eval.bootstrap_samples=100"]


def test_registry_round_trip_returns_the_identical_model(tiny_dataset, tmp_path, opts, capsys, tiny_checkpoint):
    from mmcore.checkpoint import load_checkpoint
    from pipelines.config import load_config
    from pipelines.evaluate import evaluate
    from pipelines.registry import register_and_gate, resolve_model

    cfg = load_config("debug", [o for o in opts[3::2]])
    ckpt = tiny_checkpoint(tiny_dataset, tmp_path / "ckpt", seed=1)
    report = evaluate(cfg, ckpt, tiny_dataset)
    reg = register_and_gate(cfg, ckpt, report, {"dataset_version": report["dataset_version"]})
    assert reg["promoted"] and reg["champion_version"] == reg["version"] == "1"

    champion_uri = f"models:/{cfg.registry.model_name}@champion"
    local = resolve_model(cfg, champion_uri)
    a, tok_a, extra_a = load_checkpoint(ckpt)
    b, tok_b, extra_b = load_checkpoint(local)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert tok_a.get_vocab() == tok_b.get_vocab() and extra_a == extra_b
    # The registered model scores exactly what the checkpoint scored.
    again = evaluate(cfg, champion_uri, tiny_dataset, tmp_path / "again")
    assert again["metrics"] == report["metrics"]

    # CLI: eval prints the card; registry list/show/promote/rollback work on the same store.
    assert cli(["eval", *opts, "--data", str(tiny_dataset)]) == 0
    out = capsys.readouterr().out
    assert "i2t_r1" in out and report["benchmark"] in out
    ckpt2 = tiny_checkpoint(tiny_dataset, tmp_path / "ckpt2", seed=2)
    reg2 = register_and_gate(cfg, ckpt2, evaluate(cfg, ckpt2, tiny_dataset), {})
    assert cli(["registry", "promote", *opts, cfg.registry.model_name, reg2["version"]]) == 0
    capsys.readouterr()
    assert cli(["registry", "show", *opts, cfg.registry.model_name]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == reg2["version"]
    assert cli(["registry", "rollback", *opts, cfg.registry.model_name]) == 0
    assert cli(["registry", "list", *opts]) == 0
    listing = capsys.readouterr().out
    assert "* v1" in listing and "v2" in listing


def test_caption_answer_retrieve_on_image_files(tiny_dataset, tmp_path, opts, capsys, tiny_checkpoint):
    ckpt = tiny_checkpoint(tiny_dataset, tmp_path / "ckpt", seed=3)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (120 + 10 * i, 90), colour).save(folder / f"{colour}.png")
    (folder / "notes.txt").write_text("not an image")
    images = sorted(str(p) for p in folder.glob("*.png"))
    assert cli(["caption", *opts, "--model", str(ckpt), *images]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == images
    assert cli(["answer", *opts, "--model", str(ckpt), images[0], "what colour is the shape?"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1  # one answer line (untrained: maybe empty)
    assert cli(["retrieve", *opts, "--model", str(ckpt), "--images", str(folder), "--text", "a red square",
                "--top-k", "2"]) == 0
    ranked = capsys.readouterr().out.strip().splitlines()
    assert len(ranked) == 2 and all(ln.split("\t")[1] in images for ln in ranked)
    scores = [float(ln.split("\t")[0]) for ln in ranked]
    assert scores == sorted(scores, reverse=True)


def test_caption_real_photos(coco_mini, tmp_path, opts, tiny_dataset, capsys, tiny_checkpoint):
    ckpt = tiny_checkpoint(tiny_dataset, tmp_path / "ckpt", seed=4)
    photos = sorted((coco_mini / "val2017").glob("*.jpg"))[:3]
    assert cli(["caption", *opts, "--model", str(ckpt), *map(str, photos)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    shutil.rmtree(tmp_path / "ckpt")


def test_explain_draws_one_attention_panel_per_generated_word(tiny_dataset, tmp_path, opts, capsys, tiny_checkpoint):
    from pipelines.evaluate.explain import COLUMNS, LABEL_HEIGHT, PANEL

    ckpt = tiny_checkpoint(tiny_dataset, tmp_path / "ckpt", seed=5)
    photo = tmp_path / "scene.png"
    Image.new("RGB", (80, 64), "red").save(photo)
    for extra, kind in (([], "caption"), (["--question", "what colour is the shape?"], "answer")):
        out = tmp_path / f"{kind}.png"
        assert cli(["explain", *opts, "--model", str(ckpt), str(photo), "--out", str(out), *extra]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert lines[0].startswith(f"{kind}: ") and str(out) in lines[1]
        words = int(lines[1].split()[2])
        panels = words + 1  # the input, then one per word
        cols, rows = min(COLUMNS, panels), -(-panels // COLUMNS)
        with Image.open(out) as sheet:
            assert sheet.format == "PNG"
            assert sheet.size == (cols * PANEL, rows * (PANEL + LABEL_HEIGHT) + LABEL_HEIGHT)
