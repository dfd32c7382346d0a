"""Write a trained model as a `.nemo` archive in NVIDIA's layout.

The archive is what NeMo's `save_to` writes (architecture.md §5.1): a plain tar
whose members start with `./`:

- `model_config.yaml`: the `model:` section (`preprocessor`, `encoder`, `decoder`,
  `joint`, `decoding`, `tokenizer`, `model_defaults`, `target`), from which
  `ModelConfig.from_nemo` rebuilds exactly the config that was exported;
- `model_weights.ckpt`: `torch.save` of the state dict under NeMo's key names
  (caster's module names are NeMo's);
- the tokenizer artifacts `<hex>_tokenizer.model`, `<hex>_vocab.txt` and
  `<hex>_tokenizer.vocab`, referenced from the config as `nemo:<hex>_...`.

caster's own format is `caster.checkpoint.native.save_native`.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import time
from pathlib import Path
from typing import Any

import sentencepiece
import torch
import yaml

from caster.checkpoint import Checkpoint, validate_checkpoint
from caster.config import ModelConfig

NEMO_TARGET = "nemo.collections.asr.models.rnnt_bpe_models.EncDecRNNTBPEModel"
NEMO_PROMPT_TARGET = (
    "nemo.collections.asr.models.rnnt_bpe_models_prompt.EncDecRNNTBPEModelWithPrompt"
)
# NeMo's training dither (FilterbankFeatures applies it in training mode only).
NEMO_DITHER = 1e-5
_SPECIAL_PIECE = re.compile(r"<.*>$")


def nemo_model_config(config: ModelConfig, pieces: list[str], tokenizer_prefix: str) -> dict:
    """The `model_config.yaml` mapping NeMo builds this model from.

    Args:
        config: the model's config.
        pieces: the tokenizer's pieces in id order (NeMo lists them as the joint's vocabulary).
        tokenizer_prefix: the hex prefix of the tokenizer artifacts in the archive.
    """
    mel, enc, dec = config.mel, config.encoder, config.decoder
    sr = mel.sample_rate
    defaults: dict[str, Any] = {
        "enc_hidden": enc.d_model,
        "pred_hidden": dec.pred_hidden,
        "joint_hidden": dec.joint_hidden,
    }
    if config.prompt is not None:
        defaults["initialize_prompt_feature"] = True
        defaults["num_prompts"] = config.prompt.num_prompts
        defaults["prompt_dictionary"] = dict(config.prompt.dictionary)
    cfg: dict[str, Any] = {
        "sample_rate": sr,
        "model_defaults": defaults,
        "tokenizer": {
            "dir": "tokenizer",
            "type": "bpe",
            "model_path": f"nemo:{tokenizer_prefix}_tokenizer.model",
            "vocab_path": f"nemo:{tokenizer_prefix}_vocab.txt",
            "spe_tokenizer_vocab": f"nemo:{tokenizer_prefix}_tokenizer.vocab",
        },
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": sr,
            "normalize": "NA",
            "window_size": mel.win_length / sr,
            "window_stride": mel.hop_length / sr,
            "window": "hann",
            "features": mel.n_mels,
            "n_fft": mel.n_fft,
            "frame_splicing": 1,
            "dither": NEMO_DITHER,
            "pad_to": 0,
            "preemph": mel.preemph,
            "log": True,
            "log_zero_guard_type": "add",
            "log_zero_guard_value": mel.log_zero_guard_value,
            "mag_power": mel.mag_power,
            "lowfreq": mel.lowfreq,
            "highfreq": mel.highfreq,
            "mel_norm": mel.mel_norm,
            "exact_pad": False,
            "pad_value": mel.pad_value,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": enc.feat_in,
            "feat_out": -1,
            "n_layers": enc.n_layers,
            "d_model": enc.d_model,
            "use_bias": enc.use_bias,
            "subsampling": "dw_striding",
            "subsampling_factor": enc.subsampling_factor,
            "subsampling_conv_channels": enc.subsampling_conv_channels,
            "causal_downsampling": True,
            "reduction": None,
            "ff_expansion_factor": enc.ff_expansion_factor,
            "self_attention_model": "rel_pos",
            "n_heads": enc.n_heads,
            "att_context_size": [list(c) for c in enc.att_context_size],
            "att_context_probs": (
                None if enc.att_context_probs is None else list(enc.att_context_probs)
            ),
            "att_context_style": "chunked_limited",
            "xscaling": enc.xscaling,
            "untie_biases": True,
            "pos_emb_max_len": enc.pos_emb_max_len,
            "conv_kernel_size": enc.conv_kernel_size,
            "conv_norm_type": enc.conv_norm_type,
            "conv_context_size": "causal",
            "dropout": enc.dropout,
            "dropout_pre_encoder": enc.dropout_pre_encoder,
            "dropout_emb": 0.0,
            "dropout_att": enc.dropout_att,
        },
        "decoder": {
            "_target_": "nemo.collections.asr.modules.RNNTDecoder",
            "normalization_mode": None,
            "random_state_sampling": False,
            "blank_as_pad": True,
            "prednet": {
                "pred_hidden": dec.pred_hidden,
                "pred_rnn_layers": dec.pred_rnn_layers,
                "t_max": None,
                "dropout": dec.dropout,
            },
            "vocab_size": dec.vocab_size,
        },
        "joint": {
            "_target_": "nemo.collections.asr.modules.RNNTJoint",
            "log_softmax": None,
            "preserve_memory": False,
            "fuse_loss_wer": False,
            "fused_batch_size": -1,
            "jointnet": {
                "joint_hidden": dec.joint_hidden,
                "activation": "relu",
                "dropout": dec.dropout,
                "encoder_hidden": enc.d_model,
                "pred_hidden": dec.pred_hidden,
            },
            "num_classes": dec.vocab_size,
            "vocabulary": list(pieces),
        },
        "decoding": {
            "model_type": "rnnt",
            "strategy": "greedy_batch",
            "greedy": {"max_symbols": dec.max_symbols},
        },
        "loss": {"loss_name": "default"},
        "labels": list(pieces),
        "target": NEMO_PROMPT_TARGET if config.prompt is not None else NEMO_TARGET,
    }
    if config.prompt is not None:
        cfg["num_prompts"] = config.prompt.num_prompts
    return cfg


def nemo_state_dict(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The state dict as NeMo names it: CPU float tensors, joint output layer renamed.

    NeMo builds `joint_net` as Sequential(ReLU, Linear) when the joint dropout is
    0, so its output layer is then index 1, not 2.
    """
    state = {k: v.detach().cpu().contiguous().clone() for k, v in checkpoint.state_dict.items()}
    if checkpoint.config.decoder.dropout == 0.0:
        for suffix in ("weight", "bias"):
            key = f"joint.joint_net.2.{suffix}"
            if key in state:
                state[f"joint.joint_net.1.{suffix}"] = state.pop(key)
    return state


def export_nemo(checkpoint: Checkpoint, path: str | os.PathLike) -> Path:
    """Write `checkpoint` as a `.nemo` archive that caster (and NeMo) can load.

    The file is written under a temporary name and renamed, so an interrupted
    export never leaves a truncated archive at `path`.

    Args:
        checkpoint: config, weights (NeMo names) and tokenizer.
        path: the `.nemo` file to write (parent directories are created).

    Returns:
        The path written.

    Raises:
        CheckpointError: the checkpoint is inconsistent (see `validate_checkpoint`).
    """
    validate_checkpoint(checkpoint)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = checkpoint.tokenizer_model
    processor = sentencepiece.SentencePieceProcessor(model_proto=tokenizer)
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    scores = [processor.get_score(i) for i in range(processor.get_piece_size())]
    # Deterministic artifact names (NeMo uses random uuid4 hex; any 32 hex digits work).
    prefix = hashlib.md5(tokenizer).hexdigest()
    config = nemo_model_config(checkpoint.config, pieces, prefix)
    weights = io.BytesIO()
    torch.save(nemo_state_dict(checkpoint), weights)
    members = {
        "model_config.yaml": yaml.safe_dump(config, sort_keys=False, allow_unicode=True).encode(),
        "model_weights.ckpt": weights.getvalue(),
        f"{prefix}_tokenizer.model": tokenizer,
        f"{prefix}_vocab.txt": _nemo_vocab_txt(pieces).encode(),
        f"{prefix}_tokenizer.vocab": "".join(
            f"{p}\t{s:g}\n" for p, s in zip(pieces, scores, strict=True)
        ).encode(),
    }
    tmp = path.with_name(path.name + ".partial")
    now = time.time()
    with tarfile.open(tmp, "w:") as tar:
        root = tarfile.TarInfo("./")
        root.type, root.mode, root.mtime = tarfile.DIRTYPE, 0o755, now
        tar.addfile(root)
        for name, data in members.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size, info.mode, info.mtime = len(data), 0o644, now
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(path)
    return path


def _nemo_vocab_txt(pieces: list[str]) -> str:
    """NeMo's `vocab.txt`: word-initial pieces without "▁", the others as "##piece"."""
    lines = []
    for piece in pieces:
        if _SPECIAL_PIECE.match(piece):
            continue
        if piece.startswith("▁") and len(piece) > 1:
            lines.append(piece[1:])
        else:
            lines.append(piece if piece == "▁" else f"##{piece}")
    return "".join(f"{line}\n" for line in lines)
