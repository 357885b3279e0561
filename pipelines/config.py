"""The one config loader: YAML presets -> typed pydantic sections, with dotted overrides.

Every entry point (CLI command, Prefect flow, test) calls `load_config` once and passes the
typed sections down. Sections map one-to-one to YAML top-level keys:
`data`, `model`, `train`, `scaling`, `eval`, `registry`, `flow`, `services`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mmcore.overrides import flatten_overrides

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PRESETS = ("debug", "local", "cluster")
SPLIT_NAMES = ("train", "val", "test")  # the splits a dataset version has (`core.dataset.SPLITS`)


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the input and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SectionView:
    """Base of a frozen dataclass that holds some fields of a config section, under the same
    names, for code that should not see the rest (an ingest worker's image cleaning). Made only
    by `of(section)`, so the section stays the one owner of their values, defaults and checks."""

    @classmethod
    def of(cls, section: _Section):
        return cls(**{f.name: getattr(section, f.name) for f in dataclasses.fields(cls)})


class DataConfig(_Section):
    """Where raw data comes from and how it is cleaned, split and sharded."""

    source: str | None = None  # raw data path/URI; None = synthesise the shapes set
    format: str | None = None  # coco|vqa|jsonl|csv|parquet|folder|webdataset; None = guess
    root: str | None = None  # where dataset versions live; None = $MMFUSION_HOME/datasets
    synth_num: int = 600
    synth_seed: int = 0
    split_fractions: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1}
    )
    image_size: int = 256  # resize target of the stored (cleaned) image
    resize_mode: Literal["shorter", "longer", "center_crop", "none"] = "shorter"
    jpeg_quality: int = 90
    min_side: int = 16
    max_aspect: float = 6.0
    max_pixels: int = 64_000_000
    min_caption_chars: int = 3
    max_caption_chars: int = 500
    dedup_distance: int = 4  # perceptual-hash Hamming distance for near duplicates; <0 disables
    shard_samples: int = 1000
    shard_max_bytes: int = 256 * 1024 * 1024
    http_timeout_s: float = 10.0  # connecting, and each read of a response
    http_retries: int = 2
    fetch_timeout_s: float = Field(60.0, gt=0)  # one image's whole download (all tries and redirects)
    max_image_bytes: int = Field(64 * 1024 * 1024, gt=0)  # a larger image file, URL or tar member is a reject
    # Image URLs that resolve to loopback, private, link-local or multicast addresses are
    # refused (a manifest is untrusted input); true for a private mirror or tests on 127.0.0.1.
    allow_private_urls: bool = False
    # Downloads in flight in each ingest worker (URL sources); enough to cover web latency: at
    # 100-200 ms a round trip, 64 keep a CPU busy decoding. At most `fetch_per_host` go to one host.
    fetch_concurrency: int = Field(64, ge=1, le=1024)
    fetch_per_host: int = Field(16, ge=1)
    # Bytes downloaded and not yet decoded, per worker, above which no new download starts.
    fetch_buffer_bytes: int = Field(64 * 1024 * 1024, gt=0)
    # Cleaned images of URLs kept under <root>/_urlcache/, so that a re-run (after a kill, or on a
    # list that grew) downloads only what it has not cleaned before; false: always download.
    url_cache: bool = True
    columns: dict[str, str] = Field(default_factory=dict)  # csv/parquet column names
    # Audio (a sample's `audio` file: stored as mono 16-bit FLAC at audio_sample_rate; see
    # pipelines/ingest/audioclean.py for each reject reason).
    audio_sample_rate: int = Field(16_000, ge=1000, le=192_000)  # resampled to this (soxr)
    min_audio_s: float = Field(0.1, ge=0)  # shorter clips are `too_short`
    max_audio_s: float = Field(60.0, gt=0)  # longer are `too_long` (read from the header: not decoded)
    max_audio_bytes: int = Field(32 * 1024 * 1024, gt=0)  # a larger audio file, URL or tar member is a reject
    audio_silence_dbfs: float = -60.0  # a clip whose peak is below this is `silent_audio`
    max_clipped_fraction: float = Field(0.01, ge=0, le=1)  # more samples at full scale: `clipped_audio`
    # The synthetic set also speaks each caption and asks each question by voice (espeak-ng):
    # `synthesize(..., audio=cfg.data.synth_audio)`; `mmfusion data synth --audio`.
    synth_audio: bool = False
    # Size of the WordPiece tokenizer ingest trains on the train split and stores in the version
    # (`<version>/tokenizer/`); every training run on the version uses it.
    vocab_size: int = Field(1000, ge=16)

    @field_validator("split_fractions")
    @classmethod
    def _known_splits(cls, fractions: dict[str, float]) -> dict[str, float]:
        """Only train/val/test are ever written: a sample sent to any other name would be counted
        as kept and be in no shard."""
        valid = ", ".join(SPLIT_NAMES)
        for name, frac in fractions.items():
            if name not in SPLIT_NAMES:
                raise ValueError(f"unknown split {name!r}; the splits are {valid} "
                                 f"(e.g. data.split_fractions={{train: 0.8, val: 0.1, test: 0.1}})")
            if not (frac >= 0 and frac != float("inf")):
                raise ValueError(f"split {name!r} has fraction {frac}; each fraction is a finite number >= 0")
        if not fractions or sum(fractions.values()) <= 0:
            raise ValueError(f"no split has a fraction above 0; give at least one of {valid} a positive fraction")
        return fractions


class ModelConfig(_Section):
    """Which mmcore preset to build, and the few knobs worth changing from YAML."""

    preset: Literal["debug", "small", "base", "large"] = "debug"  # large: ~1.1B, needs scaling.strategy=fsdp
    fusion: Literal["cross_attention", "gated", "concat"] | None = None  # None = the preset's
    image_encoder: str | None = None  # e.g. resnet18, resnet50, vit; None = the preset's
    image_size: int | None = None  # model input resolution; None = the preset's
    vocab_size: int = 1000  # tokenizer size for a dataset version without one of its own (old ingest)
    max_text_len: int = 32
    max_answer_len: int = 8
    tokenizer: str | None = None  # local dir of a pretrained tokenizer; None = train one
    image_pretrained: str | None = None  # torchvision state-dict file
    text_pretrained: str | None = None  # HF BERT directory
    # An audio encoder (mmcore.encoders.audio preset) for the audio tasks (asr, audio_retrieval,
    # spoken_vqa) on data with spoken captions/questions; None: an image-text model.
    audio_encoder: Literal["debug", "small", "base"] | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)  # dotted keys into mmcore's config

    @field_validator("overrides")
    @classmethod
    def _dotted_overrides(cls, value: dict[str, Any]) -> dict[str, Any]:
        """`--set model.overrides.image.patch_size=32` nests dicts; mmcore takes `image.patch_size`."""
        return flatten_overrides(value)


class TrainConfig(_Section):
    steps: int = 300  # pretraining optimiser steps
    finetune_steps: int = 150
    # What the pretraining steps train, alternated per step: "pretrain" is ITC + ITM (+ word-region)
    # + captioning on one batch; "caption" alone costs 60% of it and teaches the image encoder to
    # see faster (bench/results/learning-2026-12-02-c.md).
    pretrain_tasks: list[str] = Field(default_factory=lambda: ["pretrain"])
    finetune_tasks: list[str] = Field(default_factory=lambda: ["caption", "vqa"])
    # A curriculum for pretraining: its first `curriculum_steps` steps draw only samples whose
    # primary (spoken) caption has at most `curriculum_max_words` words, then all samples. Short
    # utterances first lets the ASR decoder learn to align with the clip before long transcripts
    # (bench/results/audio-2026-12-03.md). 0: off. Fine-tuning never uses it.
    curriculum_steps: int = Field(0, ge=0)
    curriculum_max_words: int = Field(8, ge=1)
    # What the curriculum's steps train, alternated per step; empty: `pretrain_tasks`, as after it.
    # `[asr]` spends the short phase on speech alone, where the decoder learns to find the words.
    curriculum_tasks: list[str] = Field(default_factory=list)
    batch_size: int = 32  # per worker
    grad_accum: int = 1
    lr: float = 1e-3
    finetune_lr: float = 5e-4
    weight_decay: float = 0.05
    # The image encoder's lr as a multiple of the rest's (both phases): it learns what every task
    # reads from scratch, from gradients that reach it through the fusion and the decoder.
    image_lr_scale: float = Field(1.0, gt=0)
    warmup_steps: int = 30
    grad_clip: float = 1.0
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    lm_weight: float = 1.0
    token_itc_weight: float = 1.0  # word-region (FILIP) loss, for models with model token_embed
    label_smoothing: float = 0.1
    ctc_weight: float = Field(0.3, ge=0)  # asr's CTC loss beside the decoder's, for model.overrides asr_ctc
    # Question-answer pairs per image in a VQA step, each its own row, the image encoded once: more
    # answers learnt per step at a fraction of the cost of more steps.
    qa_per_sample: int = Field(1, ge=1)
    # ITM also trains on each caption with one word swapped for the word another caption of the
    # batch has in its place, a negative as close as evaluation's hardest (mmcore.data.negatives).
    itm_edit_negatives: bool = False
    # With itm_edit_negatives: the share of those negatives that instead swap two words of one kind
    # within the caption ("a red circle left of a blue square" -> "a blue circle left of a red
    # square"): the same words as the truth, bound to the wrong objects, which is the negative a
    # bag of words cannot reject (mmcore.data.negatives).
    itm_swap_negatives: float = Field(0.0, ge=0, le=1)
    # After fine-tuning in the retrain flow (`mmfusion train calibrate` by hand): fit ITM's score on the
    # validation split, a logistic regression on the head's logit and the caption decoder's token
    # log-probabilities, into the final checkpoint (pipelines.evaluate.calibrate). Test ITM 0.72 /
    # 0.77 / 0.85 -> 0.98 / 0.97 / 0.94 on the default recipe's runs at seeds 0-2, in ~3 s.
    calibrate_itm: bool = True
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    eval_every: int = 100
    max_failures: int = 2
    loader_workers: int = 1
    shuffle_buffer: int = 256
    seed: int = 0
    log_every: int = 10
    # Rank 0's progress line (step/total, task, loss, samples/s, time left): at most this often, in
    # seconds, and at the last step; the driver relays it (the Prefect flow log). 0: every step.
    progress_every_s: float = Field(10.0, ge=0)
    storage: str | None = None  # Ray Train storage path / URI; None = $MMFUSION_HOME/ray_results
    min_lr_ratio: float = 0.1  # cosine decay floor, as a fraction of the peak lr
    val_max_samples: int = 512  # validation reads at most this many val samples
    fail_at_step: int | None = None  # test device: one rank exits once at this step (marker file)
    max_nonfinite_steps: int = 20  # NaN/Inf steps in a row (each skipped) that fail the run; 0: never
    nonfinite_at_steps: list[int] = Field(default_factory=list)  # test device: NaN loss at these steps
    # torch.compile the model (GPU): text padded to fixed lengths (model.max_text_len, max_answer_len)
    # so that every batch has one shape and nothing recompiles.
    compile: bool = False
    # Recompute each transformer block's activations in the backward instead of keeping them
    # (torch's composable activation checkpointing): less memory, about one more forward per step.
    activation_checkpointing: bool = False
    # "champion": the retrain flow fine-tunes the registered champion's weights on the new data
    # (no pretraining); None, or no champion yet: pretrain, then fine-tune.
    init_from: Literal["champion"] | None = None

    @model_validator(mode="after")
    def _swaps_need_edits(self) -> TrainConfig:
        if self.itm_swap_negatives and not self.itm_edit_negatives:
            raise ValueError(f"train.itm_swap_negatives={self.itm_swap_negatives} is a share of the edited ITM "
                             "negatives, and train.itm_edit_negatives is off; set train.itm_edit_negatives=true")
        return self


class ScalingConfig(_Section):
    # An int, or [min, max]: elastic training (Ray Train), which runs on as many workers as the
    # cluster has, at least min, and continues smaller after losing a node instead of waiting.
    num_workers: int | tuple[int, int] = 2
    # Elastic only: while the group runs, how often Ray Train asks whether the cluster now holds
    # more workers, and if so restarts the group bigger from the last checkpoint. Ray's default
    # (60 s) lets a group that started small (nodes still registering) stay small for a minute.
    elastic_resize_s: float = Field(60.0, ge=0)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    strategy: Literal["ddp", "fsdp"] = "ddp"  # fsdp: FSDP2, parameters sharded across the workers
    fsdp_reduce_dtype: Literal["float32", "bfloat16"] = "float32"  # fsdp on GPU: gradient reduction dtype

    @field_validator("num_workers")
    @classmethod
    def _worker_range(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if not 1 <= low <= high:
            raise ValueError(f"num_workers={value!r}: give a count >= 1, or [min, max] with 1 <= min <= max "
                             "(e.g. scaling.num_workers=[2,8])")
        return value

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]


class EvalConfig(_Section):
    batch_size: int = 64
    max_len: int = 24
    num_beams: int = 1
    itm_rerank_k: int = 0  # 0 = no ITM re-ranking
    # Audio-text retrieval (a model with audio): re-rank each query's top k (by the contrastive
    # embeddings) by how well the clip explains the text, log p(text | clip) under the speech
    # decoder: a2t R@1 0.225 -> 0.775 on one model (bench/results/audio-2026-12-03.md). 0: off.
    audio_rerank_k: int = Field(16, ge=0)
    num_samples_shown: int = 5
    bootstrap_samples: int = 1000
    parallel: Literal["auto", "ray", "local"] = "auto"  # auto = Ray when the test split has many shards
    ray_min_shards: int = 4  # auto: use Ray tasks (one per shard) from this many test shards
    ray_cpus_per_task: float = 1.0


class RegistryConfig(_Section):
    model_name: str = "mmfusion-debug"
    primary_metric: str = "i2t_r1"
    higher_is_better: bool = True
    margin: float = 0.0
    confidence: float = 0.95
    experiment: str = "mmfusion"


class FlowConfig(_Section):
    """How the Prefect flows run their steps: timeouts in seconds (None = no limit), and retries
    with exponential backoff on transient failures (I/O, MLflow, Ray job submission)."""

    ingest_timeout_s: float | None = Field(4 * 3600.0, gt=0)
    train_timeout_s: float | None = Field(24 * 3600.0, gt=0)  # each of pretrain and fine-tune
    evaluate_timeout_s: float | None = Field(4 * 3600.0, gt=0)
    register_timeout_s: float | None = Field(1800.0, gt=0)
    retries: int = Field(3, ge=0)  # ingest, evaluate, register: their I/O is idempotent
    train_retries: int = Field(1, ge=0)  # a retried training run resumes from its last checkpoint
    retry_backoff_s: float = Field(10.0, ge=0)  # the first retry's delay; each next one doubles
    retry_jitter: float = Field(0.2, ge=0)  # delays vary randomly by about this fraction; 0: exact


class ServicesConfig(_Section):
    """Service addresses. None means: the usual variable if set, else the embedded default."""

    home: str | None = None  # state dir; None = $MMFUSION_HOME or ./.mmfusion
    ray_address: str | None = None  # None = $RAY_ADDRESS or a local in-process Ray
    prefect_api_url: str | None = None  # None = $PREFECT_API_URL or Prefect's ephemeral API
    mlflow_tracking_uri: str | None = None  # None = $MLFLOW_TRACKING_URI or sqlite under home
    ray_num_cpus: int | None = None  # local Ray only


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    flow: FlowConfig = Field(default_factory=FlowConfig)
    services: ServicesConfig = Field(default_factory=ServicesConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def hash(self) -> str:
        """A short, stable hash of the whole config (lineage tag)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# ----------------------------------------------------------------------------- loading


def resolve_config_path(path_or_preset: str | os.PathLike | None) -> Path | None:
    """A file path, or a preset name (`debug`, `local`, `cluster`) looked up in configs/."""
    if path_or_preset is None:
        return None
    p = Path(path_or_preset)
    if p.is_file():
        return p
    if str(path_or_preset) in PRESETS and (CONFIG_DIR / f"{path_or_preset}.yaml").is_file():
        return CONFIG_DIR / f"{path_or_preset}.yaml"
    raise ConfigError(
        f"config file not found: {path_or_preset!s}. Pass a YAML file path or one of the presets "
        f"{', '.join(PRESETS)} (in {CONFIG_DIR})."
    )


def _parse_value(text: str) -> Any:
    """`--set` values are YAML scalars: 3, 0.5, true, null, [a, b], {k: v}, plain strings."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` to a nested dict in place."""
    if "=" not in assignment:
        raise ConfigError(f"bad --set {assignment!r}: expected dotted.key=value, e.g. train.steps=50")
    key, _, raw = assignment.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"bad --set {assignment!r}: empty key")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"bad --set {assignment!r}: {part!r} is not a section")
    node[parts[-1]] = _parse_value(raw)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Parse a YAML file (or preset name; None = all defaults) and apply `--set` overrides."""
    tree: dict[str, Any] = {}
    resolved = resolve_config_path(path)
    if resolved is not None:
        try:
            tree = yaml.safe_load(resolved.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{resolved}: not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"{resolved}: top level must be a mapping of sections")
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        where = f" in {resolved}" if resolved else ""
        lines = [
            f"  {'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()
        ]
        raise ConfigError(f"invalid config{where} (after --set overrides):\n" + "\n".join(lines)) from e


# ----------------------------------------------------------------------------- state + services


def home_dir(cfg: Config | None = None) -> Path:
    """The state directory: datasets, checkpoints, MLflow SQLite, Ray storage live under it."""
    raw = (cfg.services.home if cfg else None) or os.environ.get("MMFUSION_HOME") or ".mmfusion"
    path = Path(raw).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def datasets_root(cfg: Config) -> str:
    return cfg.data.root or str(home_dir(cfg) / "datasets")


def train_storage(cfg: Config) -> str:
    return cfg.train.storage or str(home_dir(cfg) / "ray_results")


def mlflow_tracking_uri(cfg: Config) -> str:
    uri = cfg.services.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{home_dir(cfg) / 'mlflow.db'}"


def mlflow_artifact_root(cfg: Config) -> str:
    return str(home_dir(cfg) / "mlartifacts")


def ray_address(cfg: Config) -> str | None:
    return cfg.services.ray_address or os.environ.get("RAY_ADDRESS") or None
