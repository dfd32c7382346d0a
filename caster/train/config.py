"""Training configuration: one YAML file, overridable from the command line.

`load_train_config("run.yaml", ["--optim.lr=3e-4", "--run.max_steps=2000"])` reads
the file, applies each `--dotted.key=value` (the value is parsed as YAML, so
`--augment.spec_augment=null` and `--data.train=[a.jsonl]` work) and builds a
`TrainConfig`. Every key is checked: an unknown or mistyped key is an error
naming the keys that exist, never silently ignored. `examples/train_tiny.yaml`
documents every field.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from caster.config import ModelConfig
from caster.presets import preset_config


class TrainConfigError(ValueError):
    """A training config file or override is malformed."""


@dataclass(frozen=True)
class ModelSection:
    # A checkpoint to fine-tune (.nemo, Hugging Face or caster directory); None: from scratch.
    init: str | None = None
    # Architecture for training from scratch: a preset name (caster.presets), else caster's
    # default ModelConfig; `config` then overrides any field of it (nested like ModelConfig).
    # With `init`, `config` may change only shape-free fields (dropout, contexts, probs).
    preset: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    # Parts not trained: encoder, decoder (or its alias predictor), joint, prompt_kernel.
    freeze: list[str] = field(default_factory=list)
    # Locales to add to free slots of the prompt dictionary (prompt models only).
    new_languages: list[str] = field(default_factory=list)
    # Weight of an auxiliary CTC loss on the encoder (a training-only head, not exported);
    # 0: off (0.3 is the usual weight of hybrid CTC/transducer training).
    ctc_weight: float = 0.0
    # The first steps train the encoder with the CTC loss alone (needs ctc_weight > 0): the
    # prediction network and joint do not run, so a step costs about a fifth of a transducer
    # step (measured at vocabulary 2048). 0: the RNN-T loss from the first step.
    ctc_only_steps: int = 0
    # Pruned RNN-T loss (k2's): the joint runs at only prune_range label positions per frame,
    # those where a "simple" loss (two training-only linear heads, not exported, whose sum is
    # the joint) puts its paths; that loss is added with simple_loss_weight. The joint is
    # most of a transducer step's cost; 0: the joint runs on the whole lattice.
    prune_range: int = 0
    simple_loss_weight: float = 0.5


@dataclass(frozen=True)
class TokenizerSection:
    # A SentencePiece .model file; None: train one on the training transcripts
    # (from-scratch only; its size is the decoder's vocab_size).
    model: str | None = None
    # Prompt models only: a new tokenizer gets one `<xx-XX>` piece per language of the
    # training data, and every target ends with its language's tag piece where the
    # vocabulary has one (as the released 3.5 model ends its sentences), which teaches
    # `auto` mode to name the language.
    language_tags: bool = True
    model_type: str = "unigram"  # unigram (the released models' algorithm) or bpe
    # Share of characters the new vocabulary covers (the rest become <unk>, and utterances
    # containing them are skipped); 1.0 for small alphabets.
    character_coverage: float = 0.9995


@dataclass(frozen=True)
class DataSection:
    # Training manifests (JSON lines: audio_filepath, duration, text, lang); `weights` (same
    # length, optional) mixes them by sampling probability.
    train: list[str] = field(default_factory=list)
    weights: list[float] | None = None
    validation: list[str] = field(default_factory=list)
    max_batch_seconds: float = 60.0  # audio seconds per batch (per process)
    num_buckets: int = 10  # duration buckets; batches hold utterances of similar length
    min_duration: float = 0.1  # seconds; shorter utterances are skipped
    max_duration: float = 30.0  # seconds; longer utterances are skipped (<= max_batch_seconds)
    num_workers: int = 0  # DataLoader worker processes


@dataclass(frozen=True)
class AugmentSection:
    # SpecAugment on the mel features (None: off): freq_masks, freq_width (bins), time_masks,
    # time_width (frames, or a fraction of each utterance as a float). NeMo's 0.6B recipe:
    # {freq_masks: 2, freq_width: 27, time_masks: 10, time_width: 0.05}.
    spec_augment: dict[str, Any] | None = None
    # Speed perturbation: one factor drawn per utterance, e.g. [0.9, 1.0, 1.1]; [1.0]: off.
    speed_factors: list[float] = field(default_factory=lambda: [1.0])
    # Noise mixing: a manifest of noise recordings, the share of utterances that get noise
    # and the signal-to-noise range in dB.
    noise_manifest: str | None = None
    noise_prob: float = 0.5
    noise_snr_db: list[float] = field(default_factory=lambda: [10.0, 30.0])
    # Gaussian noise added to the waveform before the mel front end (NeMo's training dither).
    dither: float = 1e-5


@dataclass(frozen=True)
class OptimSection:
    lr: float = 1e-3  # peak learning rate, reached at the end of warm-up
    min_lr: float = 1e-6  # floor of the decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    weight_decay: float = 1e-3
    warmup_steps: int = 1000
    schedule: str = "cosine"  # after warm-up: cosine (to min_lr at max_steps), noam, constant
    # Linear decay to min_lr over the last decay_steps steps before max_steps, on top of the
    # schedule (0: none). With "constant" this is warmup-stable-decay: a run can go on at its
    # peak rate for as long as wanted and still end annealed.
    decay_steps: int = 0
    grad_clip: float | None = 1.0  # max global gradient norm (None: no clipping)
    accumulate: int = 1  # micro-batches per optimizer step
    # Step the subsampling's output Linear as if its inputs were centred (caster.train.centering;
    # the model is unchanged): from scratch, caster's encoder stayed on the blank plateau without.
    centre_front: bool = True


@dataclass(frozen=True)
class RunSection:
    max_steps: int = 100_000  # optimizer steps
    precision: str = "auto"  # auto (bf16 on GPUs that have it, else fp32), bf16, fp32
    device: str = "auto"  # auto (cuda if available), cpu, cuda
    ema_decay: float | None = None  # exponential moving average of the weights (None: off)
    # Language prompt per utterance: "language" (its true language), "auto", or "mix"
    # (auto with probability auto_ratio, as the released 3.5 model was trained: about 0.5).
    prompt_mode: str = "mix"
    auto_ratio: float = 0.5
    log_every: int = 10  # steps between metrics lines
    val_every: int = 1000  # steps between validations (0: only at the end)
    save_every: int = 1000  # steps between resumable checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # most recent training checkpoints kept
    # Chunk sizes validated (ms); empty: one per trained attention context.
    val_chunk_ms: list[int] = field(default_factory=list)
    progress: bool = True  # progress bar on the main process
    # Continue from the newest training checkpoint in output_dir when there is one ("auto"),
    # from a given training-state file (a path), or never (null: start over).
    resume: str | None = "auto"


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/caster"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        config = _build(cls, d, "")
        _validate(config)
        return config


def load_train_config(
    path: str | os.PathLike | None, overrides: typing.Sequence[str] = ()
) -> TrainConfig:
    """Read a training config and apply command-line overrides.

    Args:
        path: a YAML file (None: all defaults).
        overrides: `--dotted.key=value` strings (the leading `--` is optional);
            the value is parsed as YAML.

    Returns:
        The validated config.

    Raises:
        TrainConfigError: the file is unreadable or not a mapping, an override
            is malformed, a key is unknown, or a value has the wrong type.
    """
    raw: Any = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise TrainConfigError(f"cannot read training config {path}: {e}") from e
        if not isinstance(raw, dict):
            raise TrainConfigError(f"{path} holds a {type(raw).__name__}, not a mapping")
    raw = copy.deepcopy(raw)
    for override in overrides:
        apply_override(raw, override)
    return TrainConfig.from_dict(raw)


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `--a.b.c=value` in the nested dict `raw` (in place)."""
    key, sep, value = override.removeprefix("--").partition("=")
    if not sep or not key:
        raise TrainConfigError(f"override {override!r} is not of the form --key=value")
    try:
        parsed = yaml.safe_load(value) if value else None
    except yaml.YAMLError as e:
        raise TrainConfigError(f"override {override!r}: the value is not valid YAML: {e}") from e
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise TrainConfigError(f"override {override!r}: {part!r} is not a section")
        node = child
    node[last] = parsed


def model_config(section: ModelSection, base: ModelConfig | None = None) -> ModelConfig:
    """The ModelConfig of a run: `base` (a checkpoint's), a preset or the default, plus overrides.

    Raises:
        TrainConfigError: an unknown preset or a malformed override.
    """
    if base is None:
        try:
            base = preset_config(section.preset) if section.preset else ModelConfig()
        except ValueError as e:
            raise TrainConfigError(str(e)) from e
    merged = _deep_merge(base.to_dict(), section.config, "model.config")
    try:
        return ModelConfig.from_dict(merged)
    except ValueError as e:
        raise TrainConfigError(f"model.config: {e}") from e


def _deep_merge(base: dict[str, Any], update: dict[str, Any], where: str) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if key not in out:
            raise TrainConfigError(
                f"unknown key {where}.{key}; known keys: {', '.join(sorted(out))}"
            )
        # The prompt dictionary is replaced as a whole, not merged key by key.
        if isinstance(value, dict) and isinstance(out[key], dict) and key != "dictionary":
            out[key] = _deep_merge(out[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{where or 'the config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise TrainConfigError(
            f"unknown key(s) {', '.join(sorted(map(str, unknown)))} in "
            f"{where or 'the config'}; known keys: {', '.join(sorted(names))}"
        )
    values = {}
    for name, value in raw.items():
        path = f"{where}.{name}" if where else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, path)
        else:
            values[name] = _check_type(value, hint, path)
    return cls(**values)


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """`value` converted to `hint` where that is lossless (int -> float), else an error."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, where)
            except TrainConfigError as e:
                errors.append(str(e))
        raise TrainConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list | tuple):
            raise TrainConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise TrainConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads 3e-4 (no dot) as a string.
        with contextlib.suppress(ValueError):
            return float(value)
    if hint is Any or (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        return value
    raise TrainConfigError(f"{where} must be {hint.__name__}, got {value!r}")


def _validate(c: TrainConfig) -> None:
    def require(cond: bool, message: str) -> None:
        if not cond:
            raise TrainConfigError(message)

    require(
        c.optim.schedule in ("cosine", "noam", "constant"), "optim.schedule: cosine|noam|constant"
    )
    require(c.optim.lr > 0 and c.optim.min_lr >= 0, "optim.lr must be > 0, optim.min_lr >= 0")
    require(len(c.optim.betas) == 2, "optim.betas must be two numbers")
    require(c.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    require(c.optim.decay_steps >= 0, "optim.decay_steps must be >= 0")
    require(
        math.isfinite(c.model.ctc_weight) and c.model.ctc_weight >= 0,
        "model.ctc_weight must be >= 0",
    )
    require(
        c.model.ctc_only_steps == 0 or c.model.ctc_weight > 0,
        "model.ctc_only_steps needs a CTC head: set model.ctc_weight > 0",
    )
    require(c.model.ctc_only_steps >= 0, "model.ctc_only_steps must be >= 0")
    require(
        c.model.prune_range == 0 or c.model.prune_range >= 2,
        "model.prune_range must be 0 (no pruning) or >= 2",
    )
    require(
        math.isfinite(c.model.simple_loss_weight) and c.model.simple_loss_weight >= 0,
        "model.simple_loss_weight must be >= 0",
    )
    require(c.optim.accumulate >= 1, "optim.accumulate must be >= 1")
    require(c.optim.grad_clip is None or c.optim.grad_clip > 0, "optim.grad_clip must be > 0")
    require(c.run.max_steps >= 1, "run.max_steps must be >= 1")
    require(c.run.precision in ("auto", "bf16", "fp32"), "run.precision: auto|bf16|fp32")
    require(c.run.prompt_mode in ("language", "auto", "mix"), "run.prompt_mode: language|auto|mix")
    require(0.0 <= c.run.auto_ratio <= 1.0, "run.auto_ratio must lie in [0, 1]")
    require(
        c.run.ema_decay is None or 0.0 < c.run.ema_decay < 1.0, "run.ema_decay must lie in (0, 1)"
    )
    require(
        min(c.run.log_every, c.run.val_every, c.run.save_every) >= 0, "run.*_every must be >= 0"
    )
    require(c.run.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1")
    require(c.data.max_batch_seconds > 0, "data.max_batch_seconds must be > 0")
    require(c.data.num_buckets >= 1, "data.num_buckets must be >= 1")
    require(c.data.num_workers >= 0, "data.num_workers must be >= 0")
    require(
        c.data.weights is None or len(c.data.weights) == len(c.data.train),
        "data.weights must have one weight per data.train manifest",
    )
    require(len(c.augment.noise_snr_db) == 2, "augment.noise_snr_db must be [low, high]")
    require(len(c.augment.speed_factors) >= 1, "augment.speed_factors must not be empty")
    require(0.0 <= c.augment.noise_prob <= 1.0, "augment.noise_prob must lie in [0, 1]")
    spec_keys = {"freq_masks", "freq_width", "time_masks", "time_width"}
    unknown = set(c.augment.spec_augment or {}) - spec_keys
    require(
        not unknown,
        f"augment.spec_augment: unknown keys {sorted(unknown)}; use {sorted(spec_keys)}",
    )
    require(c.tokenizer.model_type in ("unigram", "bpe"), "tokenizer.model_type: unigram|bpe")
    require(0 < c.tokenizer.character_coverage <= 1, "tokenizer.character_coverage in (0, 1]")
    known_parts = ("preprocessor", "encoder", "decoder", "predictor", "joint", "prompt_kernel")
    for part in c.model.freeze:
        require(part in known_parts, f"model.freeze: {part!r} is not one of {known_parts}")
