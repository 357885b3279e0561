"""The training driver: resolve data, tokenizer and model config once, then run Ray Train.

`run_training(cfg, data_dir, task)` builds a `TorchTrainer` with `ScalingConfig` (workers, GPUs,
resources per worker), `RunConfig` (storage under the state dir or object storage, run name),
`FailureConfig` (worker-group restarts) and `CheckpointConfig` (how many to keep), runs it, and
returns the final checkpoint directory. Re-running with the same run name resumes (Ray Train V2
restores the run's checkpoint list from its storage folder); while a driver runs, it holds its run
folder's lock (`runlock`), so a second live driver with the same run name fails instead of writing
into the same folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmcore.tasks import AUDIO_TASKS
from mmcore.tasks import TASKS as MODEL_TASKS
from pipelines.config import Config, home_dir, mlflow_tracking_uri, train_storage
from pipelines.core.checkpoints import CONFIG, CONFIG_FILES, TRAINER_STATE, WEIGHTS, is_checkpoint_dir
from pipelines.core.dataset import version_id
from pipelines.core.mlflow import artifact_location, create_experiment
from pipelines.train.job import DataSpec, RunSpec, Tracking, TrainJob

log = logging.getLogger("pipelines.train")

TASKS = (*MODEL_TASKS, "finetune")  # the model's tasks, and `finetune` = train.finetune_tasks in turn


class TrainingError(RuntimeError):
    """Training could not start or did not finish; the message names the input and the fix."""


def resolve_tasks(cfg: Config, task: str) -> list[str]:
    """What the steps train, alternated per step: `pretrain` means `train.pretrain_tasks` and
    `finetune` means `train.finetune_tasks`; any other task trains alone."""
    if task not in TASKS:
        raise TrainingError(f"unknown training task {task!r}; use one of {', '.join(TASKS)}")
    key = {"pretrain": "pretrain_tasks", "finetune": "finetune_tasks"}.get(task)
    tasks = list(getattr(cfg.train, key)) if key else [task]
    bad = [t for t in tasks if t not in MODEL_TASKS]
    if not tasks or bad:
        raise TrainingError(
            f"train.{key}={tasks!r} is not a non-empty list of "
            f"{'/'.join(MODEL_TASKS)}; fix it in the config or with --set"
        )
    return tasks


def curriculum_tasks(cfg: Config, task: str) -> list[str]:
    """What pretraining's curriculum steps train (`train.curriculum_tasks`), checked; empty for
    other runs, without a curriculum, or when it trains `train.pretrain_tasks`."""
    t = cfg.train
    if task != "pretrain" or not t.curriculum_steps:
        return []
    bad = [x for x in t.curriculum_tasks if x not in MODEL_TASKS]
    if bad:
        raise TrainingError(
            f"train.curriculum_tasks={list(t.curriculum_tasks)!r} names {', '.join(map(repr, bad))}, which is not a "
            f"task; use {'/'.join(MODEL_TASKS)}, or [] to train train.pretrain_tasks during the curriculum too")
    return list(t.curriculum_tasks)


def check_audio_tasks(tasks: list[str], model_cfg, task: str) -> None:
    """Audio tasks need a model with an audio encoder."""
    audio = [t for t in tasks if t in AUDIO_TASKS]
    if audio and model_cfg.audio is None:
        raise TrainingError(
            f"training {task} runs the audio task(s) {', '.join(audio)}, but the model has no audio encoder; "
            "set model.audio_encoder (e.g. debug) in the config, or leave the audio tasks out of "
            "train.pretrain_tasks / train.finetune_tasks")


def resolve_init(cfg: Config, init_from: str | os.PathLike | None) -> str | None:
    """A local checkpoint directory for `init_from`: a path, or `models:/NAME@alias|/VERSION`."""
    if init_from is None:
        return None
    if str(init_from).startswith("models:/"):
        from pipelines.core.model_uri import resolve_model

        return str(Path(resolve_model(cfg, str(init_from))).resolve())
    path = Path(init_from).expanduser().resolve()
    if not is_checkpoint_dir(path):
        raise TrainingError(
            f"--init {init_from}: not a checkpoint directory (needs {WEIGHTS} and {CONFIG}). "
            "Pass the directory printed by `mmfusion train pretrain`, or a models:/NAME@alias URI."
        )
    return str(path)


def split_urls(data_dir: str, split: str) -> list[str]:
    from pipelines.core.dataset import shard_paths

    try:
        urls = shard_paths(data_dir, split)
    except FileNotFoundError as e:
        raise TrainingError(str(e)) from e
    if not urls:
        raise TrainingError(
            f"dataset version {data_dir} has no {split} shards; ingest more data or change "
            f"data.split_fractions so that the {split} split is not empty"
        )
    return [u if "://" in u else str(Path(u).resolve()) for u in urls]


def check_split_size(cfg: Config, data_dir: str) -> None:
    """Every reader (`scaling.num_workers` x `train.loader_workers` of them) needs at least one
    train sample: with fewer samples than readers some reader's stream would be empty."""
    from pipelines.core.dataset import read_manifest, split_entries

    workers, loaders = cfg.scaling.max_workers, max(cfg.train.loader_workers, 1)
    readers = workers * loaders
    samples = sum(int(e.get("samples", 0)) for e in split_entries(read_manifest(data_dir), "train"))
    if samples < readers:
        raise TrainingError(
            f"the train split of {data_dir} has {samples} sample(s), fewer than the {readers} data readers "
            f"(scaling.num_workers={workers} x train.loader_workers={cfg.train.loader_workers}), so some "
            "reader would get no data. Lower train.loader_workers (0 reads in the training process) or "
            "scaling.num_workers, or ingest more data."
        )


def default_run_name(cfg: Config, task: str, version: str, init_dir: str | None) -> str:
    """Deterministic: the same command on the same data resumes (or returns) the same run."""
    key = json.dumps({"cfg": cfg.to_dict(), "task": task, "version": version, "init": init_dir}, sort_keys=True)
    return f"{task}-{version[:12]}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def run_dir(cfg: Config, run_name: str) -> str:
    storage = train_storage(cfg)
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    return f"{storage.rstrip('/')}/{run_name}"


def dataset_tokenizer(cfg: Config, data_dir: str):
    """The dataset version's WordPiece tokenizer: the one ingest trained and stored in the version
    (`<version>/tokenizer/`, checked against its sha256 in the manifest). A version ingested before
    versions carried one gets one trained here on its train split, once, kept under
    `$MMFUSION_HOME/tokenizers/` (training breaks frequency ties in hash order, so training again
    could give other ids, and every run on one version must share them)."""
    from mmcore.data import load_tokenizer
    from pipelines.core.dataset import DatasetError, fetch_tokenizer

    version = version_id(data_dir)
    try:
        folder = fetch_tokenizer(data_dir, home_dir(cfg) / "tokenizers" / f"{version}-ingested")
    except DatasetError as e:
        raise TrainingError(str(e)) from e
    if folder is not None:
        return load_tokenizer(folder)
    return legacy_tokenizer(cfg, data_dir, version)


def legacy_tokenizer(cfg: Config, data_dir: str, version: str):
    """For a version without `tokenizer/`: train one (`model.vocab_size`) on its train split, once."""
    from mmcore.data import load_tokenizer, train_tokenizer
    from pipelines.core.dataset import sample_texts

    size = cfg.model.vocab_size
    cached = home_dir(cfg) / "tokenizers" / f"{version}-v{size}"
    if (cached / "tokenizer.json").is_file():
        return load_tokenizer(cached)
    print(f"[train] notice: dataset version {version} has no tokenizer/ (ingested before versions carried "
          f"their tokenizer); training a {size}-token WordPiece tokenizer on its train split, kept in {cached}. "
          "Re-ingest the data to have the version carry its own.", flush=True)
    tokenizer = train_tokenizer(sample_texts(split_urls(data_dir, "train")), size)
    staging = cached.with_name(f"{cached.name}.tmp-{os.getpid()}")
    tokenizer.save_pretrained(str(staging))
    try:
        staging.rename(cached)  # atomic; a concurrent run that won the race keeps its copy
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return load_tokenizer(cached)


def tokenizer_and_model_config(cfg: Config, data_dir: str, start_dir: str | None):
    """(tokenizer, FusionModelConfig). From a checkpoint (resume / fine-tune) when given, else
    `model.tokenizer` or the dataset version's WordPiece tokenizer (`dataset_tokenizer`)."""
    from mmcore.checkpoint import read_config
    from mmcore.data import load_tokenizer, special_token_ids
    from mmcore.model import model_config

    if start_dir:
        model_cfg, _ = read_config(start_dir)
        return load_tokenizer(start_dir), model_cfg
    m = cfg.model
    if m.tokenizer:
        tokenizer = load_tokenizer(m.tokenizer)
    else:
        tokenizer = dataset_tokenizer(cfg, data_dir)
    model_cfg = model_config(
        m.preset, audio_encoder=m.audio_encoder, vocab_size=len(tokenizer), fusion=m.fusion, image_encoder=m.image_encoder,
        image_size=m.image_size, image_pretrained=m.image_pretrained, text_pretrained=m.text_pretrained,
        **special_token_ids(tokenizer), **m.overrides,
    )
    return tokenizer, model_cfg


def existing_checkpoint(cfg: Config, run_name: str, run_path: str) -> str | None:
    """The latest complete checkpoint of the run (a re-run resumes it), as a local directory, or None.

    A resumed run takes its model config and tokenizer from that checkpoint, never from this
    host's tokenizer cache or the current config. For a run on object storage only those files
    (a few KB) are copied here; the weights and optimiser stay in the bucket, and Ray Train hands
    them to the workers.
    """
    from pipelines.core.storage import get_fs, is_remote
    from pipelines.train.state import latest_checkpoint

    found = latest_checkpoint(run_path)
    if found is None or not is_remote(str(found)):
        return str(found) if found else None
    fs, ckpt = get_fs(str(found))
    local = home_dir(cfg) / "resume" / run_name / ckpt.rsplit("/", 1)[-1]
    local.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        if fs.exists(f"{ckpt}/{name}"):
            fs.get_file(f"{ckpt}/{name}", str(local / name))
    return str(local)


def build_job(cfg: Config, data_dir: str, task: str, init_from=None, run_name: str | None = None) -> TrainJob:
    """Resolve everything a worker needs: shards, tokenizer, model config, schedule, tracking."""
    from mmcore.data import SampleConfig
    from pipelines.train.telemetry import progress_every_s

    t = cfg.train
    tasks = resolve_tasks(cfg, task)
    curriculum = curriculum_tasks(cfg, task)
    init_dir = resolve_init(cfg, init_from)
    train_urls, val_urls = split_urls(data_dir, "train"), split_urls(data_dir, "val")
    check_split_size(cfg, data_dir)
    version = version_id(data_dir)
    name = run_name or default_run_name(cfg, task, version, init_dir)
    path = run_dir(cfg, name)
    resume = existing_checkpoint(cfg, name, path)
    if resume:
        print(f"[train] run {name} exists; resuming from its latest checkpoint in {path}", flush=True)
    tokenizer, model_cfg = tokenizer_and_model_config(cfg, data_dir, resume or init_dir)
    check_audio_tasks([*tasks, *curriculum], model_cfg, task)
    pretrain = task == "pretrain"
    run = RunSpec(name=name, task=task, tasks=tasks, total_steps=t.steps if pretrain else t.finetune_steps,
                  lr=t.lr if pretrain else t.finetune_lr, uri=path, path=None if "://" in path else path,
                  init_from=init_dir, progress_every_s=progress_every_s(t.progress_every_s),
                  lineage={"dataset_version": version, "data_dir": str(data_dir), "config_hash": cfg.hash(),
                           "init_from": str(init_from) if init_from else None, "preset": cfg.model.preset})
    text_positions = model_cfg.text.max_positions or cfg.model.max_text_len
    sample = SampleConfig(image_size=model_cfg.image.image_size, max_answer_len=cfg.model.max_answer_len,
                          max_text_len=min(cfg.model.max_text_len, text_positions), audio=model_cfg.audio is not None,
                          qa_per_sample=t.qa_per_sample, caption_variants=t.itm_edit_negatives,
                          swap_share=t.itm_swap_negatives)
    data = DataSpec(train_urls, val_urls, tokenizer, sample, eval_batch_size=cfg.eval.batch_size)
    tracking = Tracking(mlflow_tracking_uri(cfg), cfg.registry.experiment, artifact_location(cfg))
    return TrainJob(run, data, model_cfg, train=t, scaling=cfg.scaling, tracking=tracking)


def build_trainer(cfg: Config, job: TrainJob, callbacks: Sequence = ()):
    """The TorchTrainer for `job` (Ray Train V2 API); `callbacks` are `ray.train.UserCallback`s
    (`mmfusion tune` passes one that forwards validation reports to Ray Tune)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.train.loop import train_loop_per_worker

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    storage = run_dir(cfg, job.run.name).rsplit("/", 1)[0]
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=s.elastic_resize_s),
        run_config=RunConfig(
            name=job.run.name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=max(cfg.train.keep_checkpoints, 1)),
            logging_config=LoggingConfig(log_level="WARNING"),  # our own progress lines suffice
            callbacks=list(callbacks),
        ),
    )


def check_resources(cfg: Config) -> None:
    """On a local Ray (which cannot grow), fail fast instead of waiting forever for workers."""
    import ray

    from pipelines.config import ray_address

    if ray_address(cfg):
        return  # a cluster may autoscale: let Ray Train wait for it
    s = cfg.scaling
    have = ray.cluster_resources()
    need = {"CPU": s.min_workers * s.cpus_per_worker}  # elastic: the smallest group it may run
    if s.use_gpu:
        need["GPU"] = s.min_workers * s.gpus_per_worker
    short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if have.get(k, 0.0) < v}
    if short:
        detail = ", ".join(f"{k}: need {v:g}, have {h:g}" for k, (v, h) in short.items())
        raise TrainingError(
            f"the local Ray cluster is too small for scaling.num_workers={s.min_workers} ({detail}). "
            "Lower scaling.num_workers / scaling.cpus_per_worker, set scaling.use_gpu=false, or "
            "point services.ray_address (RAY_ADDRESS) at a bigger cluster."
        )


def final_checkpoint_dir(cfg: Config, result, job: TrainJob) -> Path:
    """A local directory holding the run's last checkpoint (downloaded when storage is remote)."""
    checkpoint = result.checkpoint
    if checkpoint is None:
        # A re-run of a finished run whose last report Ray did not register trains nothing and
        # reports nothing: its final checkpoint is on disk.
        from pipelines.train.state import latest_checkpoint

        found = latest_checkpoint(job.run.path) if job.run.path else None
        if found and summary(Path(found)).get("step") == job.run.total_steps:
            return Path(found)
        raise TrainingError(f"run {job.run.name} finished without a checkpoint; see the log above")
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return Path(checkpoint.path)
    local = home_dir(cfg) / "checkpoints" / job.run.name / Path(checkpoint.path).name
    if not local.is_dir():
        checkpoint.to_directory(str(local))
    return local


def run_training(cfg: Config, data_dir, task: str, init_from=None, run_name: str | None = None,
                 callbacks: Sequence = (), on_progress: Callable[[str], None] | None = None) -> Path:
    """Pretrain or fine-tune on a dataset version with Ray Train; returns the final checkpoint dir.

    `task`: pretrain | caption | vqa | retrieval | finetune (= `train.finetune_tasks`, alternated).
    `init_from`: a checkpoint directory or `models:/NAME@alias` to start from (fine-tuning).
    One live driver per run name (`pipelines.train.runlock`): a second one fails with TrainingError.
    Rank 0's progress line (`telemetry.TrainProgress`) shows on this process's stderr: redrawn in
    place on a terminal, a plain line every `train.progress_every_s` in a log. `on_progress` also
    gets those plain lines, in this process (e.g. the Prefect run's API log; it must not print to
    the console itself, or they show twice).
    """
    from pipelines.runtime import quiet_environment
    from pipelines.train.runlock import RunInUseError, run_lock

    quiet_environment()
    job = build_job(cfg, str(data_dir), task, init_from, run_name)
    create_experiment(cfg, required=False)  # here, before Ray: workers only look it up
    try:
        with run_lock(job.run.uri):
            return fit(cfg, job, callbacks, on_progress)
    except RunInUseError as e:
        raise TrainingError(f"run {job.run.name}: {e}") from e


def fit(cfg: Config, job: TrainJob, callbacks: Sequence = (),
        on_progress: Callable[[str], None] | None = None) -> Path:
    """Run the job's TorchTrainer (the caller holds the run's lock); the final checkpoint dir.
    A run the NaN/Inf guard stopped left a note in its folder: raise it as a TrainingError.
    Rank 0's progress lines show on stderr and go to `on_progress` while it runs
    (`telemetry.relay_progress`)."""
    from pipelines.core.storage import exists, join, read_json, remove
    from pipelines.runtime import init_ray
    from pipelines.train.guard import ABORT_FILE
    from pipelines.train.telemetry import relay_progress

    abort_note = join(job.run.uri, ABORT_FILE)
    if exists(abort_note):  # from an earlier attempt of this run: this one decides afresh
        remove(abort_note)
    init_ray(cfg)
    check_resources(cfg)
    trainer = build_trainer(cfg, job, callbacks)
    s = cfg.scaling
    workers = s.num_workers if isinstance(s.num_workers, int) else f"{s.min_workers}-{s.max_workers} (elastic)"
    print(f"[train] {job.run.name}: {job.run.task} for {job.run.total_steps} steps on {workers} worker(s) "
          f"({s.strategy}), storage {job.run.uri}", flush=True)
    try:
        with relay_progress(job.run.uri, on_progress, every_s=cfg.train.progress_every_s):
            result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; keep the cause and name the run
        raise TrainingError(f"training run {job.run.name} failed: {e}") from e
    if exists(abort_note):
        note = read_json(abort_note)
        raise TrainingError(f"training run {job.run.name} stopped at step {note['step']}: {note['reason']}")
    path = final_checkpoint_dir(cfg, result, job)
    state = summary(path) if (path / TRAINER_STATE).is_file() else {}
    print(f"[train] {job.run.name} done at step {state.get('step')}: {path} "
          f"({state.get('samples_per_s', 0.0):.1f} samples/s)", flush=True)
    return path


def summary(path: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint directory."""
    from pipelines.train.state import read_trainer_state

    return read_trainer_state(path)
