"""The training loop: model setup, cache-aware RNN-T steps, validation, checkpoints, export.

Scoring is `caster.train.evaluate`; the weight average, RNG states and state files are
`caster.train.state`; the metrics log, plot and progress bar `caster.train.metrics`.

One optimizer step:

1. `accumulate` micro-batches come from the duration-bucketed sampler (this process's shard);
2. one attention context is drawn from `encoder.att_context_size` with `att_context_probs`
   (multi-lookahead training: the encoder is a pure function of its context, so one model
   learns every chunk size, as the released models were trained);
3. each utterance gets its language prompt: its true language, `auto`, or a mix;
4. forward (dither -> mel -> SpecAugment -> encoder -> prompt -> joint) under bf16 autocast
   on GPUs, RNN-T loss (on the lattice pruned to `model.prune_range` label positions per
   frame, when set; plus `model.ctc_weight` x the CTC loss of a training-only head on
   the encoder, when set; the CTC loss alone for the first `model.ctc_only_steps`) summed
   per utterance and divided by the global number of utterances of the step, so any split
   over processes and micro-batches gives the same gradient;
5. gradient clipping, AdamW with warm-up + decay, optional weight EMA.

Exact resume: the training state holds the weights, optimizer, EMA, step, sampler position
and every RNG state; all other randomness (context, prompts, SpecAugment masks, the data's
augmentation, worker seeds) is drawn from generators seeded by (seed, step, ...), so a
resumed run continues with the very losses of an uninterrupted one. The main process
writes the checkpoints into `output_dir`, so a job spread over machines needs it on a shared
file system to resume; resuming with another number of processes works but is not exact.

Every process draws the same context for a step, from (seed, step): all micro-batches of the
step, on all processes, train the same chunk size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from caster.audio import load_audio
from caster.checkpoint import Checkpoint, load_checkpoint
from caster.checkpoint.native import save_native
from caster.config import EncoderConfig, ModelConfig, PromptConfig
from caster.languages import AUTO, LanguageError, resolve_language
from caster.model import build_transducer
from caster.tokenizer import Tokenizer
from caster.train.augment import spec_augment
from caster.train.centering import CentredInputs
from caster.train.config import (
    AugmentSection,
    OptimSection,
    TrainConfig,
    TrainConfigError,
    model_config,
)
from caster.train.data import (
    AsrDataset,
    Batch,
    DurationBucketSampler,
    ManifestEntry,
    MixedManifests,
    SkipCounter,
    collate,
    filter_entries,
    read_manifest,
)
from caster.train.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    init_distributed,
    shutdown,
)
from caster.train.evaluate import (
    choose_prompts,
    error_rates,
    evaluate,
    language_id_rates,
    merge_scores,
    prompt_modes,
    trained_chunk_ms,
)
from caster.train.export import export_nemo
from caster.train.loss import (
    prune_windows,
    pruned_rnnt_loss_from_parts,
    rnnt_loss_from_parts,
    simple_rnnt_loss,
)
from caster.train.metrics import (
    METRICS_FILE,
    PLOT_FILE,
    plot_metrics,
    progress_bar,
    read_metrics,
    truncate_metrics,
    write_metrics,
)
from caster.train.state import (
    STATE_VERSION,
    TrainStateError,
    WeightAverage,
    latest_training_state,
    load_training_state,
    rng_state,
    save_training_state,
    saved_states,
    set_rng_state,
    state_path,
)
from caster.train.tokenizer import train_tokenizer
from caster.transducer import Transducer

logger = logging.getLogger(__name__)

FREEZABLE = ("preprocessor", "encoder", "decoder", "joint", "prompt_kernel")


# ----------------------------------------------------------------------------- model


def add_languages(prompt: PromptConfig | None, locales: Sequence[str]) -> PromptConfig | None:
    """Give each new locale the lowest prompt index that no dictionary key uses.

    Locales already in the dictionary keep their index. The new index's one-hot
    column of `prompt_kernel.0.weight` exists already (it is untrained), so the
    weights keep their shapes.

    Raises:
        TrainConfigError: the model has no prompt, or every index is taken.
    """
    if not locales:
        return prompt
    if prompt is None:
        raise TrainConfigError("model.new_languages needs a model with a language prompt")
    dictionary = dict(prompt.dictionary)
    used = set(dictionary.values())
    for locale in locales:
        if locale in dictionary:
            continue
        free = next((i for i in range(prompt.num_prompts) if i not in used), None)
        if free is None:
            raise TrainConfigError(
                f"no free prompt slot for {locale!r}: all {prompt.num_prompts} are used"
            )
        dictionary[locale] = free
        used.add(free)
    return PromptConfig(num_prompts=prompt.num_prompts, dictionary=dictionary)


def build_model(
    cfg: TrainConfig, texts: Callable[[], Iterable[str]], languages: Sequence[str]
) -> tuple[Transducer, bytes]:
    """The network to train (CPU, train mode) and its serialized tokenizer.

    Args:
        cfg: the run's config (`model` and `tokenizer` sections).
        texts: the training transcripts, read only to train a new tokenizer.
        languages: the training data's locales, for the new tokenizer's `<xx-XX>` pieces.

    Raises:
        TrainConfigError: inconsistent settings (a tokenizer whose size differs from
            `decoder.vocab_size`, a tokenizer given with a checkpoint, ...).
        CheckpointError: `model.init` cannot be loaded or its weights do not fit.
    """
    section = cfg.model
    if section.init is not None:
        if cfg.tokenizer.model is not None:
            raise TrainConfigError("tokenizer.model cannot be combined with model.init")
        checkpoint = load_checkpoint(section.init)
        config = model_config(section, base=checkpoint.config)
        config = dataclasses.replace(
            config, prompt=add_languages(config.prompt, section.new_languages)
        )
        tokenizer = checkpoint.tokenizer_model
        net = build_transducer(Checkpoint(config, checkpoint.state_dict, tokenizer))
    else:
        config = model_config(section)
        config = dataclasses.replace(
            config, prompt=add_languages(config.prompt, section.new_languages)
        )
        if cfg.tokenizer.model is not None:
            try:
                tokenizer = Path(cfg.tokenizer.model).read_bytes()
            except OSError as e:
                raise TrainConfigError(f"tokenizer.model: cannot read {e.filename}: {e}") from e
        else:
            tags = list(languages) if cfg.tokenizer.language_tags and config.prompt else []
            tokenizer = train_tokenizer(
                texts(),
                config.decoder.vocab_size,
                tags,
                cfg.tokenizer.model_type,
                character_coverage=cfg.tokenizer.character_coverage,
            )
        torch.manual_seed(cfg.seed)
        net = Transducer(config)
    pieces = Tokenizer(tokenizer).vocab_size
    if pieces != net.cfg.decoder.vocab_size:
        raise TrainConfigError(
            f"the tokenizer has {pieces} pieces but decoder.vocab_size is "
            f"{net.cfg.decoder.vocab_size}"
        )
    return net.train(), tokenizer


def frozen_modules(net: Transducer, parts: Sequence[str]) -> list[nn.Module]:
    """The top-level modules named in `model.freeze` ("predictor" is the decoder).

    Raises:
        TrainConfigError: a name outside FREEZABLE, or a part this model lacks.
    """
    modules = []
    for part in parts:
        name = "decoder" if part == "predictor" else part
        module = getattr(net, name, None) if name in FREEZABLE else None
        if module is None:
            raise TrainConfigError(f"model.freeze: this model has no {part!r}")
        modules.append(module)
    return modules


def set_train_mode(net: Transducer, frozen: Sequence[nn.Module]) -> None:
    """Train mode (dropout on), except for frozen parts, which behave as at inference."""
    net.train()
    for module in frozen:
        module.eval()


class TransducerLoss(nn.Module):
    """The training forward pass as one module, so DDP can wrap it.

    Args:
        net: the transducer.
        augment: dither and SpecAugment settings.
        ctc_weight: weight of an auxiliary CTC loss; > 0 adds `ctc_head`, a linear layer
            from the prompted encoder output to the vocabulary and blank: a direct,
            frame-level signal to the encoder that no prediction network can stand in for
            (hybrid CTC/transducer training). Only the transducer is exported; the head
            exists for training.
        prune_range: > 0 runs the joint at only that many label positions per frame (the
            pruned RNN-T loss); adds `simple_am` and `simple_lm`, training-only linear heads
            from the encoder and prediction network to the vocabulary and blank whose "simple"
            loss chooses the positions.
        simple_loss_weight: weight of that simple loss.
    """

    def __init__(
        self,
        net: Transducer,
        augment: AugmentSection,
        ctc_weight: float = 0.0,
        prune_range: int = 0,
        simple_loss_weight: float = 0.5,
    ) -> None:
        super().__init__()
        self.net = net
        self.spec_augment = augment.spec_augment
        self.dither = augment.dither
        self.ctc_weight = ctc_weight
        self.prune_range = prune_range
        self.simple_loss_weight = simple_loss_weight
        cfg = net.cfg
        vocabulary = cfg.decoder.vocab_size + 1  # the pieces and the blank
        self.ctc_head = nn.Linear(cfg.encoder.d_model, vocabulary) if ctc_weight > 0 else None
        self.simple_am = nn.Linear(cfg.encoder.d_model, vocabulary) if prune_range else None
        self.simple_lm = nn.Linear(cfg.decoder.pred_hidden, vocabulary) if prune_range else None

    def training_heads(self) -> dict[str, nn.Linear | None]:
        """The training-only heads by their names in the training state (None: not used)."""
        return {"ctc_head": self.ctc_head, "simple_am": self.simple_am, "simple_lm": self.simple_lm}

    def forward(
        self,
        audio: Tensor,
        audio_lengths: Tensor,
        targets: Tensor,
        target_lengths: Tensor,
        prompts: Tensor | None,
        context: tuple[int, int],
        generator: torch.Generator,
        ctc_only: bool = False,
    ) -> Tensor:
        """Per-utterance RNN-T losses (plus the weighted CTC loss when there is a head).

        Args:
            audio: (B, N) waveforms; audio_lengths: (B,) samples.
            targets: (B, U) token ids; target_lengths: (B,).
            prompts: (B,) prompt indices, None for a model without a prompt.
            context: the (left, right) attention context of this step.
            generator: CPU generator for the SpecAugment masks.
            ctc_only: the CTC loss alone (encoder pre-training); the prediction network and
                joint do not run.

        Returns:
            (B,) float32 -log P(targets | audio) (over the pruned lattice with prune_range),
            plus the weighted auxiliary losses.
        """
        net = self.net
        if self.dither > 0:
            # NeMo's dither: applied before pre-emphasis; the padding is zeroed after it.
            audio = audio + self.dither * torch.randn_like(audio)
        mel, mel_lengths = net.preprocessor(audio, audio_lengths)  # (B, F, T)
        if self.spec_augment:
            mel = spec_augment(mel, mel_lengths, **self.spec_augment, generator=generator)
        encoded, encoded_lengths = net.encoder(mel, mel_lengths, context)  # (B, T', D)
        # The prompt kernel must run in float32 (architecture.md §4.1: in bf16 the language
        # signal vanishes); autocast would otherwise run its matmuls in bf16.
        with torch.autocast(encoded.device.type, enabled=False):
            encoded = net.apply_prompt(encoded.float(), prompts)
        blank = net.cfg.decoder.blank_id
        if ctc_only:
            return self._ctc(encoded, encoded_lengths, targets, target_lengths)
        # The prediction network starts from blank (SOS), then reads each target label.
        labels = torch.cat([targets.new_full((targets.shape[0], 1), blank), targets], dim=1)
        predicted, _ = net.decoder(labels)  # (B, U+1, H)
        enc_proj, pred_proj = net.joint.enc(encoded), net.joint.pred(predicted)
        if self.simple_am is None or self.simple_lm is None:
            losses = rnnt_loss_from_parts(
                net.joint.joint_net,
                enc_proj,
                pred_proj,
                targets,
                encoded_lengths,
                target_lengths,
                blank,
                reduction="none",
            )
        else:
            simple, occupancy = simple_rnnt_loss(
                self.simple_am(encoded),  # (B, T', V+1)
                self.simple_lm(predicted),  # (B, U+1, V+1)
                targets,
                encoded_lengths,
                target_lengths,
                blank,
                reduction="none",
            )
            starts, window = prune_windows(
                occupancy, encoded_lengths, target_lengths, self.prune_range
            )
            pruned = pruned_rnnt_loss_from_parts(
                net.joint.joint_net,
                enc_proj,
                pred_proj,
                starts,
                window,
                targets,
                encoded_lengths,
                target_lengths,
                blank,
                reduction="none",
            )
            losses = pruned + self.simple_loss_weight * simple
        if self.ctc_head is None:
            return losses
        return losses + self.ctc_weight * self._ctc(
            encoded, encoded_lengths, targets, target_lengths
        )

    def _ctc(
        self, encoded: Tensor, encoded_lengths: Tensor, targets: Tensor, target_lengths: Tensor
    ) -> Tensor:
        """(B,) CTC losses of the training-only head."""
        if self.ctc_head is None:
            raise ValueError("no CTC head: model.ctc_weight is 0")
        log_probs = self.ctc_head(encoded).float().log_softmax(-1)  # (B, T', V+1)
        return nn.functional.ctc_loss(
            log_probs.transpose(0, 1),  # (T', B, V+1)
            targets,
            encoded_lengths,
            target_lengths,
            blank=self.net.cfg.decoder.blank_id,
            reduction="none",
            zero_infinity=True,  # more labels than frames: no CTC path, no gradient
        )


# ------------------------------------------------------------------ per-step choices


def step_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from integers (seed, step, rank, micro-batch, ...)."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
    return torch.Generator().manual_seed(seed)


def sample_context(encoder: EncoderConfig, seed: int, step: int) -> tuple[int, int]:
    """The attention context of one step, drawn with `att_context_probs` (None: uniform).

    Every process draws the same context for the same step.
    """
    contexts = encoder.att_context_size
    probs = encoder.att_context_probs
    weights = np.ones(len(contexts)) if probs is None else np.asarray(probs, dtype=np.float64)
    if weights.shape != (len(contexts),) or not np.all(weights >= 0) or weights.sum() <= 0:
        raise TrainConfigError(
            f"encoder.att_context_probs {probs} must be one non-negative weight per context "
            f"{contexts}"
        )
    rng = np.random.default_rng([seed, step])
    return contexts[int(rng.choice(len(contexts), p=weights / weights.sum()))]


def learning_rate(step: int, optim: OptimSection, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, the schedule, then
    the final linear decay of `optim.decay_steps`."""
    rate = _scheduled_rate(step, optim, max_steps)
    left = max_steps - step
    if optim.decay_steps > 0 and left < optim.decay_steps:
        rate = optim.min_lr + (rate - optim.min_lr) * max(left, 0) / optim.decay_steps
    return rate


def _scheduled_rate(step: int, optim: OptimSection, max_steps: int) -> float:
    warmup = optim.warmup_steps
    if step < warmup:
        return optim.lr * (step + 1) / warmup
    if optim.schedule == "constant":
        return optim.lr
    if optim.schedule == "noam":
        return max(optim.min_lr, optim.lr * math.sqrt(max(warmup, 1) / (step + 1)))
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return optim.min_lr + (optim.lr - optim.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw(params: list[nn.Parameter], optim: OptimSection) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms, position biases)."""
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=optim.lr,
        betas=(optim.betas[0], optim.betas[1]),
    )


# --------------------------------------------------------------------------- trainer


class Trainer:
    """One process's share of a training run (see the module docstring).

    Args:
        cfg: the run's config.
        info: this process's place in the job (`init_distributed`).
    """

    def __init__(self, cfg: TrainConfig, info: DistInfo) -> None:
        self.cfg = cfg
        self.info = info
        self.out = Path(cfg.output_dir)
        self.metrics_path = self.out / METRICS_FILE
        self.skips = SkipCounter()
        state = self._resume_state()
        train_sources = [read_manifest(p, self.skips) for p in cfg.data.train]
        if not any(train_sources):
            raise TrainConfigError("data.train lists no manifest with usable entries")
        net, self.tokenizer_model = self._network(state, train_sources)
        self.net = net
        self.config = net.cfg
        self.tokenizer = Tokenizer(self.tokenizer_model)
        # Targets end with their language's tag where the vocabulary has tags (3.5's habit).
        self.language_tags = cfg.tokenizer.language_tags and self.config.prompt is not None
        self.frozen = frozen_modules(net, cfg.model.freeze)
        for module in self.frozen:
            module.requires_grad_(False)
        net.to(info.device)
        set_train_mode(net, self.frozen)
        self._setup_data(train_sources)
        self.val_chunks = cfg.run.val_chunk_ms or trained_chunk_ms(self.config)
        for ms in self.val_chunks:  # refuse an impossible chunk size now, not at validation
            try:
                self.config.context_for_chunk_ms(ms)
            except ValueError as e:
                raise TrainConfigError(f"run.val_chunk_ms: {e}") from e
        loss = TransducerLoss(
            net,
            cfg.augment,
            cfg.model.ctc_weight,
            cfg.model.prune_range,
            cfg.model.simple_loss_weight,
        ).to(info.device)
        self.loss = loss
        self.model: nn.Module = loss
        if info.enabled:
            ids = [info.device.index] if info.device.type == "cuda" else None
            # CTC-only steps leave the prediction network and joint without gradients.
            unused = cfg.model.ctc_only_steps > 0
            self.model = DistributedDataParallel(
                loss, device_ids=ids, find_unused_parameters=unused
            )
        self.params = [p for p in loss.parameters() if p.requires_grad]  # net + training heads
        if not self.params:
            raise TrainConfigError("model.freeze leaves nothing to train")
        self.optimizer = adamw(self.params, cfg.optim)
        front = net.encoder.pre_encode
        self.centring = CentredInputs(front, info) if cfg.optim.centre_front else None
        self.ema = None if cfg.run.ema_decay is None else WeightAverage(net, cfg.run.ema_decay)
        self.step = self.epoch = self.position = 0
        self.precision = self._precision()
        if state is not None:
            self._restore(state)
        else:
            if info.is_main:  # a fresh start: nothing of an earlier run may be resumed or plotted
                self.out.mkdir(parents=True, exist_ok=True)
                self.metrics_path.unlink(missing_ok=True)
                for stale in saved_states(self.out):
                    stale.unlink()
            # Dropout differs per process; the initial weights do not (seeded before).
            process_seed = cfg.seed + 1_000_003 * info.rank
            random.seed(process_seed)
            np.random.seed(process_seed % 2**32)
            torch.manual_seed(process_seed)

    # ----------------------------------------------------------------- setup helpers

    def _network(
        self, state: dict[str, Any] | None, train_sources: list[list[ManifestEntry]]
    ) -> tuple[Transducer, bytes]:
        """The saved network when resuming, else a new one (from scratch or a checkpoint)."""
        if state is None:
            entries = [e for source in train_sources for e in source]
            languages = sorted({e.language for e in entries if e.language})
            return build_model(self.cfg, lambda: (e.text for e in entries), languages)
        try:
            net = Transducer(ModelConfig.from_dict(state["model_config"]))
            net.load_state_dict(state["model"])
            return net, state["tokenizer"].numpy().tobytes()
        except (KeyError, TypeError, AttributeError, RuntimeError, ValueError) as e:
            raise TrainStateError(f"the training state does not hold a usable model: {e}") from e

    def _resume_state(self) -> dict[str, Any] | None:
        resume = self.cfg.run.resume
        if resume is None:
            return None
        path = latest_training_state(self.out) if resume == "auto" else Path(resume)
        if path is None:
            return None
        logger.info("resuming from %s", path)
        return load_training_state(path)

    def _precision(self) -> torch.dtype | None:
        """The autocast dtype, None for float32."""
        wanted = self.cfg.run.precision
        cuda = self.info.device.type == "cuda"
        if wanted == "auto":
            return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None
        return torch.bfloat16 if wanted == "bf16" else None

    def _usable(self, entries: list[ManifestEntry]) -> list[ManifestEntry]:
        data = self.cfg.data
        kept = []
        for entry in entries:
            if data.min_duration <= entry.duration <= data.max_duration:
                kept.append(entry)
            else:
                self.skips.skip("duration out of range", str(entry.audio_filepath))
        return filter_entries(kept, self.tokenizer, self.skips)

    def _check_languages(self, entries: list[ManifestEntry]) -> None:
        """Refuse now what `choose_prompts` would refuse in the middle of training."""
        prompt, mode = self.config.prompt, self.cfg.run.prompt_mode
        if prompt is None:
            return
        needs_auto = mode != "language" or any(e.language is None for e in entries)
        if needs_auto and AUTO not in prompt.dictionary:
            raise TrainConfigError(
                f"run.prompt_mode={mode!r} (or an utterance without a language) needs an "
                f"{AUTO!r} prompt; add it with model.new_languages: [{AUTO}]"
            )
        if mode == "auto":
            return
        for language in sorted({e.language for e in entries if e.language}):
            try:
                resolve_language(language, prompt)
            except LanguageError as e:
                raise TrainConfigError(
                    f"{e}; add it to a free prompt slot with model.new_languages"
                ) from e

    def _setup_data(self, train_sources: list[list[ManifestEntry]]) -> None:
        cfg, info = self.cfg, self.info
        sources = [self._usable(source) for source in train_sources]
        if cfg.data.weights is None:
            entries, copies = [e for s in sources for e in s], None
        else:
            mixed = MixedManifests.mix(list(zip(sources, cfg.data.weights, strict=True)))
            entries, copies = mixed.entries, mixed.weights
        self._check_languages(entries)
        noise = []
        if cfg.augment.noise_manifest is not None:
            rate = self.config.mel.sample_rate
            noise = [
                load_audio(e.audio_filepath, rate)
                for e in read_manifest(cfg.augment.noise_manifest)
            ]
        aug = cfg.augment
        self.dataset = AsrDataset(
            entries,
            self.tokenizer,
            self.config.mel.sample_rate,
            speed_factors=aug.speed_factors,
            noise=noise,
            noise_prob=aug.noise_prob if noise else 0.0,
            snr_db=(aug.noise_snr_db[0], aug.noise_snr_db[1]),
            min_seconds=cfg.data.min_duration,
            seed=cfg.seed,
            counter=self.skips,
            language_tags=self.language_tags,
        )
        self.sampler = DurationBucketSampler(
            entries,
            cfg.data.max_batch_seconds,
            cfg.data.num_buckets,
            shuffle=True,
            seed=cfg.seed,
            rank=info.rank,
            world_size=info.world_size,
            weights=copies,
            counter=self.skips,
        )
        if len(self.sampler) == 0:
            raise TrainConfigError("no training batch: every entry was skipped")
        val_entries = [e for p in cfg.data.validation for e in self._usable(read_manifest(p))]
        self._check_languages(val_entries)
        self.val_entries = val_entries
        self.val_dataset = AsrDataset(
            val_entries,
            self.tokenizer,
            self.config.mel.sample_rate,
            language_tags=self.language_tags,
        )
        # Every process scores a disjoint share of the validation batches (no repeats).
        plan = DurationBucketSampler(
            val_entries, cfg.data.max_batch_seconds, cfg.data.num_buckets, shuffle=False
        )
        self.val_batches = list(plan)[info.rank :: info.world_size] if val_entries else []

    def _restore(self, state: dict[str, Any]) -> None:
        if self.ema is not None and state.get("ema") is None:
            raise TrainStateError("the run uses run.ema_decay but the saved state has no EMA")
        heads = self.loss.training_heads()
        for name, head in heads.items():
            if (head is None) != (state.get(name) is None):
                option = "model.ctc_weight" if name == "ctc_head" else "model.prune_range"
                raise TrainStateError(f"{option} differs from the saved run's ({name})")
        try:
            for name, head in heads.items():
                if head is not None:
                    head.load_state_dict(state[name])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            if self.centring is not None and state.get("centring") is not None:
                self.centring.load_state_dict(state["centring"])
            self.step, self.epoch = int(state["step"]), int(state["epoch"])
            self.position = int(state["position"])
            rngs = list(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise TrainStateError(f"the training state does not fit this run: {e!r}") from e
        if len(rngs) == self.info.world_size:
            set_rng_state(rngs[self.info.rank])
        else:
            logger.warning(
                "saved with %d processes, resumed with %d: RNG streams restart",
                len(rngs),
                self.info.world_size,
            )
        if self.info.is_main:  # drop what the interrupted run logged after its checkpoint
            truncate_metrics(self.metrics_path, self.step)

    # --------------------------------------------------------------------- training

    def _batches(self) -> Iterator[Batch]:
        """This process's batches, epoch after epoch, from the saved sampler position."""
        cfg, info = self.cfg, self.info
        while True:
            self.sampler.load_state_dict(
                {
                    "epoch": self.epoch,
                    "position": self.position,
                    "seed": cfg.seed,
                    "world_size": info.world_size,
                    "rank": info.rank,
                }
            )
            self.dataset.set_epoch(self.epoch)
            loader = DataLoader(
                self.dataset,
                batch_sampler=self.sampler,
                collate_fn=collate,
                num_workers=cfg.data.num_workers,
                pin_memory=info.device.type == "cuda",
                # Worker seeds from the epoch, not from the global RNG (exact resume).
                generator=torch.Generator().manual_seed(cfg.seed * 100_003 + self.epoch),
            )
            for batch in loader:
                self.position += 1
                yield batch
            self.epoch += 1
            self.position = 0

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.precision)

    def _optimizer_step(self, micro: list[Batch]) -> dict[str, Any] | None:
        """One optimizer step on this process's micro-batches; None if all were empty."""
        cfg, info, device = self.cfg, self.info, self.info.device
        # A batch whose entries were all unreadable is empty; its slot is skipped on every
        # process so that DDP's gradient synchronisation stays in step.
        sizes = torch.tensor([int(b.size == 0) for b in micro], device=device)
        empty = all_reduce_sum(sizes, info)
        slots = [b for b, n in zip(micro, empty.tolist(), strict=True) if n == 0]
        if not slots:
            return None
        local = sum(b.size for b in slots)
        count = float(all_reduce_sum(torch.tensor(float(local), device=device), info))
        context = sample_context(self.config.encoder, cfg.seed, self.step)
        ctc_only = self._ctc_only(self.step)
        lr = learning_rate(self.step, cfg.optim, cfg.run.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=device)
        for j, batch in enumerate(slots):
            generator = step_generator(cfg.seed, self.step, info.rank, j)
            prompts = choose_prompts(
                batch.languages,
                self.config.prompt,
                cfg.run.prompt_mode,
                cfg.run.auto_ratio,
                generator,
            )
            batch = batch.to(device, non_blocking=True)
            synced = j == len(slots) - 1 or not info.enabled
            with contextlib.nullcontext() if synced else self.model.no_sync(), self._autocast():
                losses = self.model(
                    batch.audio,
                    batch.audio_lengths,
                    batch.targets,
                    batch.target_lengths,
                    None if prompts is None else prompts.to(device),
                    context,
                    generator,
                    ctc_only,
                )
                # DDP averages gradients over processes: scaling by world_size / count makes
                # the result the mean over every utterance of the step.
                (losses.sum() * (info.world_size / count)).backward()
            total += losses.detach().sum()
        if self.centring is not None:
            self.centring.centre_gradients()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        if math.isfinite(grad_norm):
            self.optimizer.step()
            if self.centring is not None:
                self.centring.correct_bias()
            if self.ema is not None:
                self.ema.update(self.net)
        else:
            logger.warning("step %d: non-finite gradient norm, update skipped", self.step)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss = float(all_reduce_sum(total, info)) / count
        return {
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "context": list(context),
            "utterances": int(count),
            "ctc_only": ctc_only,
        }

    def fit(self, stop_at: int | None = None) -> Path | None:
        """Train until `run.max_steps` (or `stop_at`, e.g. to end a time-limited job early).

        Returns:
            The exported model directory at max_steps; None when stopped before
            (the training state is saved, `run.resume: auto` continues).
        """
        run = self.cfg.run
        end = run.max_steps if stop_at is None else min(stop_at, run.max_steps)
        batches = self._batches()
        bar = progress_bar(run.max_steps, self.step, self.info.is_main and run.progress)
        window: list[dict[str, Any]] = []
        started = time.monotonic()
        validated = saved = -1
        while self.step < end:
            result = self._optimizer_step([next(batches) for _ in range(self.cfg.optim.accumulate)])
            if result is None:
                continue
            window.append(result)
            bar.update(1)
            bar.set_postfix(loss=f"{result['loss']:.3f}", lr=f"{result['lr']:.2e}")
            if run.log_every and self.step % run.log_every == 0:
                self._log_window(window, time.monotonic() - started)
                window = []
            if run.val_every and self.step % run.val_every == 0:
                self.validate()
                validated = self.step
            if run.save_every and self.step % run.save_every == 0:
                self.save()
                saved = self.step
        bar.close()
        if self.step < run.max_steps:
            if saved != self.step:
                self.save()
            return None
        if validated != self.step:
            self.validate()
        if saved != self.step:
            self.save()
        return self.export()

    def _log_window(self, window: list[dict[str, Any]], elapsed: float) -> None:
        if not self.info.is_main or not window:
            return
        last = window[-1]
        record = {
            "step": self.step,
            "epoch": self.epoch,
            "loss": sum(r["loss"] for r in window) / len(window),
            "lr": last["lr"],
            "grad_norm": last["grad_norm"],
            "context": last["context"],
            "ctc_only": last["ctc_only"],  # the loss is then the CTC loss alone
            "utterances": sum(r["utterances"] for r in window),
            "skipped": self.skips.total,
            "elapsed_s": round(elapsed, 3),
        }
        write_metrics(self.metrics_path, record)

    def validate(self) -> dict[str, float]:
        """Score the validation data per chunk size, prompt mode and language; log it."""
        if not self.val_entries:
            return {}
        cfg, info = self.cfg, self.info
        loader = DataLoader(
            self.val_dataset,
            batch_sampler=self.val_batches,
            collate_fn=collate,
            num_workers=cfg.data.num_workers,
            generator=torch.Generator().manual_seed(0),
        )
        modes = prompt_modes(self.config.prompt, cfg.run.prompt_mode)
        # After a CTC-only step the prediction network and joint are untrained: score what
        # the encoder has learnt through the CTC head instead.
        ctc_head = self.loss.ctc_head if self.step and self._ctc_only(self.step - 1) else None
        with self._averaged():
            self.net.eval()
            try:
                scores = evaluate(
                    self.net,
                    self.tokenizer,
                    loader,
                    lambda i: self.val_entries[i].text,
                    self.val_chunks,
                    modes,
                    info.device,
                    ctc_head,
                )
            finally:
                set_train_mode(self.net, self.frozen)
        scores = merge_scores(all_gather_objects(scores, info))
        rates = error_rates(scores.errors) | language_id_rates(scores.language_id)
        if info.is_main:
            decoder = "transducer" if ctc_head is None else "ctc"
            write_metrics(self.metrics_path, {"step": self.step, "val": rates, "decoder": decoder})
            if not plot_metrics(read_metrics(self.metrics_path), self.out / PLOT_FILE):
                logger.warning("no %s: matplotlib is not installed (caster[train])", PLOT_FILE)
            logger.info("step %d validation (%s): %s", self.step, decoder, rates)
        return rates

    def save(self) -> Path:
        """Write the resumable training state (main process); keep the newest few."""
        rngs = all_gather_objects(rng_state(), self.info)
        path = state_path(self.out, self.step)
        heads = {
            name: None if head is None else head.state_dict()
            for name, head in self.loss.training_heads().items()
        }
        if self.info.is_main:
            state = {
                "version": STATE_VERSION,
                "step": self.step,
                "epoch": self.epoch,
                "position": self.position,
                "model": self.net.state_dict(),
                **heads,
                "model_config": self.config.to_dict(),
                "tokenizer": torch.frombuffer(bytearray(self.tokenizer_model), dtype=torch.uint8),
                "optimizer": self.optimizer.state_dict(),
                "ema": None if self.ema is None else self.ema.state_dict(),
                "centring": None if self.centring is None else self.centring.state_dict(),
                "rng": rngs,
                "train_config": self.cfg.to_dict(),
            }
            save_training_state(path, state)
            for old in saved_states(self.out)[: -self.cfg.run.keep_checkpoints]:
                old.unlink()
        barrier(self.info)
        return path

    def checkpoint(self) -> Checkpoint:
        """The model to ship: the weight average if there is one, on CPU."""
        with self._averaged():
            state = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
        return Checkpoint(self.config, state, self.tokenizer_model)

    def _ctc_only(self, step: int) -> bool:
        """Whether step `step` (counted from 0) trains the encoder with the CTC loss alone."""
        return step < self.cfg.model.ctc_only_steps

    def _averaged(self) -> contextlib.AbstractContextManager:
        """Within the block, the network holds the weight average, if the run keeps one."""
        return self.ema.applied(self.net) if self.ema is not None else contextlib.nullcontext()

    def export(self) -> Path:
        """Write `model/` (caster's format) and `model.nemo` in output_dir."""
        directory = self.out / "model"
        if self.info.is_main:
            checkpoint = self.checkpoint()
            save_native(directory, checkpoint)
            export_nemo(checkpoint, self.out / "model.nemo")
        barrier(self.info)
        return directory


def train(cfg: TrainConfig, stop_at: int | None = None) -> Path | None:
    """Run (or continue) a training run in this process; under torchrun, in every process.

    Returns:
        The exported model directory (`output_dir/model`), or None when `stop_at`
        ended the run early.
    """
    info = init_distributed(cfg.run.device)
    try:
        return Trainer(cfg, info).fit(stop_at)
    finally:
        shutdown(info)
