"""The GPU knobs of `pipelines.train` that a CPU can check: static padding for `train.compile`
changes no output, and `speed_up` compiles in place without renaming the checkpoint's tensors."""

from __future__ import annotations

import pytest
import torch

from mmcore.data import SampleConfig
from pipelines.config import TrainConfig
from pipelines.train.job import DataSpec, RunSpec, TrainJob
from pipelines.train.steps import pad_static, sample_codec
from pipelines.train.worker import speed_up


@pytest.fixture(scope="module")
def tiny():
    from mmcore.data import special_token_ids, train_tokenizer
    from mmcore.model import build_model, model_config

    texts = [f"a {c} {s} on a {b} background" for c in ("red", "blue", "green") for s in ("circle", "square")
             for b in ("white", "black")]
    tok = train_tokenizer(texts, vocab_size=60)
    mcfg = model_config("debug", vocab_size=len(tok), image_size=32, **special_token_ids(tok))
    torch.manual_seed(0)
    return tok, mcfg, build_model(mcfg).eval()


def job(tok, mcfg, **train) -> TrainJob:
    return TrainJob(RunSpec("t", "pretrain", ["pretrain"], total_steps=1),
                    DataSpec([], [], tok, SampleConfig(image_size=32, max_text_len=16, max_answer_len=6)),
                    mcfg, train=TrainConfig(**train))


def test_static_padding_gives_one_shape_and_the_same_outputs(tiny):
    tok, mcfg, model = tiny
    decode, collate = sample_codec(job(tok, mcfg, compile=True), train=False)
    _, dynamic = sample_codec(job(tok, mcfg), train=False)
    raws = [{"__key__": str(i), "jpg": _jpeg(i), "txt": f"a red circle {'on a white background' * (i % 2)}",
             "json": b'{"captions": [], "qa": [{"question": "what colour", "answers": ["red"]}]}'}
            for i in range(3)]
    samples = [decode(r) for r in raws]
    fixed, varied = collate(samples), dynamic(samples)
    assert fixed["caption_ids"].shape == (3, 16) and fixed["answer_ids"].shape == (3, 6)
    assert varied["caption_ids"].shape[1] < 16  # the padding really was added
    torch.manual_seed(1)
    a = model(fixed, "caption")
    torch.manual_seed(1)
    b = model(varied, "caption")
    n = varied["caption_ids"].shape[1] - 1
    valid = b.lm_labels != -100
    assert torch.allclose(a.lm_logits[:, :n][valid], b.lm_logits[valid], atol=1e-5)
    assert (a.lm_labels[:, n:] == -100).all()
    assert pad_static(varied, {"caption": 2}, 0)["caption_ids"] is varied["caption_ids"]  # never cuts


def test_speed_up_compiles_in_place_and_keeps_the_state_dict_names(tiny):
    tok, mcfg, model = tiny
    names = list(model.state_dict())
    assert speed_up(model, job(tok, mcfg, compile=True), torch.device("cpu")) is model
    assert model._compiled_call_impl is not None  # nn.Module.compile: forward goes through torch.compile
    assert list(model.state_dict()) == names  # no `_orig_mod.` prefix: checkpoints unchanged


def _jpeg(seed: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30 * seed, 30)).save(buf, format="JPEG")
    return buf.getvalue()
