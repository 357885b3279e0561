"""`TrainJob` is composed of typed parts and still ships to Ray workers and logs the same params.

- It pickles (Ray Train ships it to every worker): every part comes back equal, the tokenizer
  encodes the same ids.
- `describe()`, the MLflow params of a run, keeps the flat names runs have always been logged
  under, with values taken from the parts (the resolved learning rate, `grad_accum` at least 1).
"""

from __future__ import annotations

import pickle

import pytest
import torch

from mmcore.data import SampleConfig, special_token_ids, train_tokenizer
from mmcore.model import FusionModelConfig, model_config
from pipelines.config import load_config
from pipelines.train.job import DataSpec, RunSpec, Tracking, TrainJob
from pipelines.train.steps import sample_codec

# The params every training run has logged to MLflow (before the job had parts), and those added
# with `train.activation_checkpointing` and the pretraining curriculum.
PARAMS = [
    "run_name", "task", "tasks", "total_steps", "sample_config", "lr", "weight_decay", "warmup_steps",
    "min_lr_ratio", "grad_clip", "grad_accum", "batch_size", "loss_weights", "checkpoint_every", "eval_every",
    "log_every", "seed", "loader_workers", "shuffle_buffer", "val_max_samples", "eval_batch_size", "init_from",
    "use_gpu", "cpus_per_worker", "compile", "activation_checkpointing",
    "curriculum_steps", "curriculum_max_words", "curriculum_tasks", "strategy", "fsdp_reduce_dtype",
    "run_path", "run_uri", "fail_at_step", "fail_marker", "max_nonfinite_steps", "nonfinite_at_steps",
    "mlflow_uri", "mlflow_experiment", "lineage",
]


@pytest.fixture(scope="module")
def job() -> TrainJob:
    tok = train_tokenizer([f"a {c} circle" for c in ("red", "green", "blue")], vocab_size=40)
    cfg = load_config("debug", ["train.grad_accum=0", "train.finetune_lr=0.0002", "train.fail_at_step=3",
                                "scaling.strategy=fsdp", "train.token_itc_weight=0.5"])
    run = RunSpec("caption-x", "finetune", ["caption", "vqa"], total_steps=7, lr=cfg.train.finetune_lr,
                  uri="/runs/caption-x", path="/runs/caption-x", lineage={"dataset_version": "v1"})
    data = DataSpec(["/d/train/shard-000000.tar"], ["/d/val/shard-000000.tar"], tok,
                    SampleConfig(image_size=64, max_text_len=16, max_answer_len=4), eval_batch_size=8)
    model = model_config("debug", vocab_size=len(tok), **special_token_ids(tok))
    return TrainJob(run, data, model, train=cfg.train, scaling=cfg.scaling,
                    tracking=Tracking("sqlite:///m.db", "exp", "/art"))


def test_job_pickles_with_every_part(job):
    back = pickle.loads(pickle.dumps(job))
    assert back.run == job.run and back.data.sample == job.data.sample and back.tracking == job.tracking
    assert isinstance(back.model, FusionModelConfig) and back.model == job.model
    assert back.train == job.train and back.scaling == job.scaling
    assert back.data.tokenizer("a red circle")["input_ids"] == job.data.tokenizer("a red circle")["input_ids"]
    assert back.describe() == job.describe()


def test_describe_keeps_the_flat_mlflow_params(job):
    params = job.describe()
    assert list(params) == PARAMS
    assert params["lr"] == 0.0002 and params["total_steps"] == 7 and params["tasks"] == ["caption", "vqa"]
    assert params["grad_accum"] == 1  # train.grad_accum=0 means 1, as it always did
    assert params["sample_config"] == {"image_size": 64, "max_text_len": 16, "max_answer_len": 4, "qa_per_sample": 1,
                                       "caption_variants": False, "swap_share": 0.0, "audio": False}
    assert params["loss_weights"] == {"itc_weight": 1.0, "itm_weight": 1.0, "lm_weight": 1.0,
                                      "token_itc_weight": 0.5, "label_smoothing": 0.1, "ctc_weight": 0.3}
    assert params["fail_marker"] == "/runs/caption-x/.fail-at-step-3"
    assert params["strategy"] == "fsdp" and params["eval_batch_size"] == 8
    assert (params["mlflow_uri"], params["mlflow_experiment"]) == ("sqlite:///m.db", "exp")
    assert "mlflow_artifact_location" not in params and "tokenizer" not in params


def test_the_curriculum_applies_to_pretraining_only(job):
    train = job.train.model_copy(update={"curriculum_steps": 50})
    finetune = TrainJob(job.run, job.data, job.model, train=train)
    pretrain = TrainJob(RunSpec("pre", "pretrain", ["asr"], total_steps=9), job.data, job.model, train=train)
    assert (pretrain.curriculum_steps, finetune.curriculum_steps) == (50, 0)
    assert pretrain.describe()["curriculum_steps"] == 50


def test_the_curriculum_trains_its_own_tasks_then_the_runs(job):
    train = job.train.model_copy(update={"curriculum_steps": 4, "curriculum_tasks": ["asr"]})
    pretrain = TrainJob(RunSpec("pre", "pretrain", ["caption", "asr", "vqa"], total_steps=9), job.data, job.model,
                        train=train)
    # Steps 0-3 are the curriculum's (ASR only); from step 4 the run's tasks, indexed by step as always.
    assert [pretrain.task_at(s) for s in range(9)] == ["asr"] * 4 + ["asr", "vqa", "caption", "asr", "vqa"]
    assert pretrain.all_tasks == ["asr", "caption", "vqa"]  # one loss each, DDP told of unused heads
    assert pretrain.describe()["curriculum_tasks"] == ["asr"]
    # Fine-tuning never runs the curriculum, nor its tasks; without curriculum tasks nothing changes.
    finetune = TrainJob(job.run, job.data, job.model, train=train)
    assert [finetune.task_at(s) for s in range(3)] == ["caption", "vqa", "caption"] and finetune.curriculum_tasks == []
    plain = TrainJob(pretrain.run, job.data, job.model, train=train.model_copy(update={"curriculum_tasks": []}))
    assert [plain.task_at(s) for s in range(4)] == ["caption", "asr", "vqa", "caption"]


def test_nested_model_overrides_from_set_reach_one_field(tmp_path):
    """`--set model.overrides.fusion.num_layers=2` nests a dict; the driver's model config must get
    `fusion.num_layers` (not a whole `fusion` replaced by a dict, nor a clash with model.fusion)."""
    from pipelines.train.driver import tokenizer_and_model_config

    tok_dir = tmp_path / "tok"
    train_tokenizer(["a red circle", "a blue square on the left"], vocab_size=60).save_pretrained(str(tok_dir))
    for form in ("model.overrides.fusion.num_layers=2", "model.overrides={fusion.num_layers: 2}"):
        cfg = load_config("debug", [form, "model.overrides.image.patch_size=32", f"model.tokenizer={tok_dir}",
                                    "model.fusion=gated"])
        assert cfg.model.overrides == {"fusion.num_layers": 2, "image.patch_size": 32}
        _, mcfg = tokenizer_and_model_config(cfg, str(tmp_path), None)
        assert (mcfg.fusion.num_layers, mcfg.fusion.kind, mcfg.image.patch_size, mcfg.image.stem) == (2, "gated", 32, "conv")


def test_the_swap_share_reaches_the_training_batches(job):
    """`train.itm_swap_negatives` travels in the job's sample config to the collate the workers use."""
    tok = job.data.tokenizer
    texts = ["a red circle and a blue square", "a blue circle and a red square", "a green circle and a red square"]

    def item(i, text):
        ids = torch.tensor(tok(text)["input_ids"])
        return {"image": torch.zeros(3, 8, 8), "caption_ids": ids, "question_ids": ids, "answer_ids": ids[:2],
                "has_qa": True, "caption_variants": [tuple(ids.tolist())], "key": str(i), "captions": [text], "qa": []}

    items = [item(i, t) for i, t in enumerate(texts)]
    for share, same_words in ((0.0, False), (1.0, True)):
        sample = SampleConfig(image_size=8, max_text_len=16, max_answer_len=4, caption_variants=True, swap_share=share)
        swapping = TrainJob(job.run, DataSpec([], [], tok, sample), job.model, train=job.train)
        batch = sample_codec(swapping, train=True)[1](items)
        for row, b in enumerate(batch["edit_neg_image"].tolist()):
            neg = batch["edit_neg_ids"][row][batch["edit_neg_mask"][row] > 0].tolist()
            cap = items[b]["caption_ids"].tolist()
            assert neg != cap and (sorted(neg) == sorted(cap)) == same_words
    assert load_config("local", ["train.itm_swap_negatives=0.5"]).train.itm_swap_negatives == 0.5
    with pytest.raises(ValueError, match="itm_edit_negatives=true"):
        load_config("local", ["train.itm_swap_negatives=0.5", "train.itm_edit_negatives=false"])
