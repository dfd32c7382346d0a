"""Read the Hugging Face transformers layout of these models, without transformers.

transformers' converters (`convert_nemotron_asr_streaming_to_hf.py` for the English
model, `convert_nemotron3_5_asr_to_hf.py` for Nemotron 3.5) write a directory:

- `config.json`: model type, decoder sizes and an `encoder_config` section;
- `model.safetensors`: the NeMo state dict under HF's module names, same shapes,
  without the featurizer buffers (`preprocessor.featurizer.window/fb`);
- `processor_config.json`: the feature extractor's settings, the supported
  lookaheads and, for 3.5, the `prompt_dictionary`;
- `tokenizer.json` (+ `tokenizer_config.json`): the SentencePiece vocabulary
  converted to a `tokenizers` BPE model. The SentencePiece file itself is not kept.

`load_hf` inverts that: the config is translated back into the NeMo config the
converter read and goes through `ModelConfig.from_nemo` (one set of checks for
both layouts), every tensor name through one table (`_HF_TO_NEMO`), and the
tokenizer is rebuilt as a SentencePiece model proto by `caster.checkpoint.hf_tokenizer`
(`tokenizer.model`, if the directory has one, is used as it is). Every file is
untrusted input.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from caster.checkpoint import Checkpoint, CheckpointError, read_checkpoint
from caster.checkpoint.hf_tokenizer import _REQUIRED, _field, _read_json, tokenizer_model
from caster.config import ConfigError, ModelConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PROCESSOR_FILE = "processor_config.json"

ENGLISH_MODEL_TYPE = "nemotron_asr_streaming"
PROMPT_MODEL_TYPE = "nemotron3_5_asr"
FEATURE_EXTRACTOR_TYPE = "NemotronAsrStreamingFeatureExtractor"

# HF tensor name -> NeMo tensor name; each pattern must match a whole name.
# Shapes are NeMo's in every case (HF keeps the k=1 Conv1d/Conv2d pointwise
# convolutions and PyTorch's LSTM gate order i, f, g, o), so renaming is all
# there is to do; `_conform` still accepts a Linear-shaped pointwise weight.
_HF_TO_NEMO: tuple[tuple[str, str], ...] = (
    # NeMo's pre_encode.conv is one Sequential: 0 conv, 1 ReLU, then per further
    # stride-2 stage a depthwise conv, a pointwise conv and a ReLU (2, 3, 4; 5, 6, 7; ...).
    (r"encoder\.subsampling\.conv_in\.(weight|bias)", r"encoder.pre_encode.conv.0.\1"),
    *(
        (
            rf"encoder\.subsampling\.layers\.{stage}\.{part}\.(weight|bias)",
            rf"encoder.pre_encode.conv.{3 * stage + offset}.\1",
        )
        for stage in range(3)  # subsampling factor up to 16
        for part, offset in (("depthwise_conv", 2), ("pointwise_conv", 3))
    ),
    (r"encoder\.subsampling\.linear\.(weight|bias)", r"encoder.pre_encode.out.\1"),
    (
        r"encoder\.layers\.(\d+)\.(norm_feed_forward[12]|norm_self_att|norm_conv|norm_out)"
        r"\.(weight|bias)",
        r"encoder.layers.\1.\2.\3",
    ),
    (
        r"encoder\.layers\.(\d+)\.(feed_forward[12])\.(linear[12])\.(weight|bias)",
        r"encoder.layers.\1.\2.\3.\4",
    ),
    *(
        (
            rf"encoder\.layers\.(\d+)\.self_attn\.{hf}\.(weight|bias)",
            rf"encoder.layers.\1.self_attn.{nemo}.\2",
        )
        for hf, nemo in (
            ("q_proj", "linear_q"),
            ("k_proj", "linear_k"),
            ("v_proj", "linear_v"),
            ("o_proj", "linear_out"),
        )
    ),
    (
        r"encoder\.layers\.(\d+)\.self_attn\.relative_k_proj\.weight",
        r"encoder.layers.\1.self_attn.linear_pos.weight",
    ),
    (r"encoder\.layers\.(\d+)\.self_attn\.bias_([uv])", r"encoder.layers.\1.self_attn.pos_bias_\2"),
    (
        r"encoder\.layers\.(\d+)\.conv\.(pointwise_conv[12]|depthwise_conv)\.(weight|bias)",
        r"encoder.layers.\1.conv.\2.\3",
    ),
    # NeMo calls the conv module's norm `batch_norm` even when it is a LayerNorm.
    (r"encoder\.layers\.(\d+)\.conv\.norm\.(weight|bias)", r"encoder.layers.\1.conv.batch_norm.\2"),
    (r"decoder\.embedding\.weight", r"decoder.prediction.embed.weight"),
    (r"decoder\.lstm\.((?:weight|bias)_(?:ih|hh)_l\d+)", r"decoder.prediction.dec_rnn.lstm.\1"),
    (r"decoder\.decoder_projector\.(weight|bias)", r"joint.pred.\1"),
    (r"encoder_projector\.(weight|bias)", r"joint.enc.\1"),
    (r"joint\.head\.(weight|bias)", r"joint.joint_net.2.\1"),
    (r"prompt_projector\.linear_1\.(weight|bias)", r"prompt_kernel.0.\1"),
    (r"prompt_projector\.linear_2\.(weight|bias)", r"prompt_kernel.2.\1"),
)
_HF_TO_NEMO_COMPILED = tuple((re.compile(p), r) for p, r in _HF_TO_NEMO)


def load_hf(path: str | os.PathLike) -> Checkpoint:
    """Load a directory in the Hugging Face transformers layout.

    Args:
        path: the directory (`config.json`, `model.safetensors`, `processor_config.json`,
            `tokenizer.json` or `tokenizer.model`).

    Returns:
        The validated checkpoint: NeMo's key names and shapes, tensors on CPU,
        no featurizer buffers (the model computes them from `config.mel`).

    Raises:
        CheckpointError: naming the directory and the reason, for a missing or
            malformed file, an unsupported model, an unknown tensor name, a
            missing tensor or a tensor of the wrong shape.
    """
    return read_checkpoint(path, _read_dir)


def _read_dir(path: Path) -> Checkpoint:
    if not path.is_dir():
        raise CheckpointError("not a directory")
    hf_config = _read_json(path / CONFIG_FILE)
    processor = _read_json(path / PROCESSOR_FILE) if (path / PROCESSOR_FILE).is_file() else {}
    try:
        config = ModelConfig.from_nemo(_nemo_config(hf_config, processor))
    except ConfigError as e:
        raise CheckpointError(f"{CONFIG_FILE}: {e}") from e
    prompt_hidden = None
    if config.prompt is not None:
        prompt_hidden = _size(hf_config, "prompt_intermediate_size", CONFIG_FILE)
    try:
        # load_file memory-maps the file: no pickle, no intermediate copy.
        hf_state = safetensors.torch.load_file(path / WEIGHTS_FILE, device="cpu")
    except safetensors.SafetensorError as e:
        raise CheckpointError(f"{WEIGHTS_FILE} is corrupt: {e}") from e
    if config.encoder.n_layers + config.decoder.pred_rnn_layers > len(hf_state):
        # Cheap guard before enumerating the expected tensors of a hostile config.
        raise CheckpointError(
            f"{CONFIG_FILE} describes more layers than {WEIGHTS_FILE}'s {len(hf_state)} tensors"
        )
    state_dict = _conform(_rename(hf_state), _expected_shapes(config, prompt_hidden))
    tokenizer = tokenizer_model(path, config.decoder.vocab_size)
    return Checkpoint(config=config, state_dict=state_dict, tokenizer_model=tokenizer)


# ---------------------------------------------------------------- config


def _nemo_config(hf: dict[str, Any], processor: dict[str, Any]) -> dict[str, Any]:
    """The NeMo `model_config.yaml` sections that transformers' converter translated.

    The converter drops what HF's model hard-codes (chunked-limited attention,
    causal subsampling and convolutions, LayerNorm in the conv module, rel-pos
    attention with untied biases); those are written back here. Training-only
    values HF does not keep (`dropout_pre_encoder`, the decoder's dropout,
    `att_context_probs`) are left to `from_nemo`'s defaults.
    """
    model_type = _field(hf, "model_type", str, CONFIG_FILE)
    if model_type not in (ENGLISH_MODEL_TYPE, PROMPT_MODEL_TYPE):
        raise CheckpointError(
            f"{CONFIG_FILE} has model_type {model_type!r}; caster reads "
            f"{ENGLISH_MODEL_TYPE!r} and {PROMPT_MODEL_TYPE!r}"
        )
    cfg = {
        "preprocessor": _nemo_preprocessor(processor),
        "encoder": _nemo_encoder(_field(hf, "encoder_config", dict, CONFIG_FILE), processor),
    }

    blank = _size(hf, "blank_token_id", CONFIG_FILE)
    outputs = _field(hf, "vocab_size", int, CONFIG_FILE)
    if outputs != blank + 1:
        # HF's vocab_size counts the joint outputs, blank included, and the blank is last.
        raise CheckpointError(
            f"{CONFIG_FILE} has vocab_size {outputs} and blank_token_id {blank}; "
            "expected the blank to be the last of vocab_size outputs"
        )
    pred_hidden = _size(hf, "decoder_hidden_size", CONFIG_FILE)
    cfg["decoder"] = {
        "vocab_size": blank,
        "blank_as_pad": True,
        "prednet": {
            "pred_hidden": pred_hidden,
            "pred_rnn_layers": _size(hf, "num_decoder_layers", CONFIG_FILE),
        },
    }
    cfg["joint"] = {
        "num_classes": blank,
        "jointnet": {
            # Written by converters whose joint width may differ from the predictor's.
            "joint_hidden": _size(hf, "joint_hidden_size", CONFIG_FILE, pred_hidden),
            "activation": _field(hf, "hidden_act", str, CONFIG_FILE),
        },
    }
    cfg["decoding"] = {"greedy": {"max_symbols": _size(hf, "max_symbols_per_step", CONFIG_FILE)}}

    if model_type == PROMPT_MODEL_TYPE:
        dictionary = _field(processor, "prompt_dictionary", dict, PROCESSOR_FILE)
        for language, index in dictionary.items():
            if type(index) is not int:
                raise CheckpointError(
                    f"{PROCESSOR_FILE} prompt_dictionary[{language!r}] is {index!r}, not an integer"
                )
        cfg["model_defaults"] = {
            "initialize_prompt_feature": True,
            "num_prompts": _size(hf, "num_prompts", CONFIG_FILE),
            "prompt_dictionary": dictionary,
        }
    return cfg


def _nemo_encoder(enc: dict[str, Any], processor: dict[str, Any]) -> dict[str, Any]:
    where = f"{CONFIG_FILE} encoder_config"
    # Fixed in caster's encoder; HF makes them settable.
    for key, fixed in (
        ("hidden_act", "silu"),
        ("subsampling_conv_kernel_size", 3),
        ("subsampling_conv_stride", 2),
    ):
        value = _field(enc, key, type(fixed), where)
        if value != fixed:
            raise CheckpointError(f"{where}.{key} is {value!r}; caster supports {fixed!r} only")
    use_bias = _field(enc, "attention_bias", bool, where)
    if _field(enc, "convolution_bias", bool, where) != use_bias:
        raise CheckpointError(
            f"{where} has attention_bias != convolution_bias; NeMo (and caster) have one "
            "use_bias for both"
        )
    d_model = _size(enc, "hidden_size", where)
    intermediate = _size(enc, "intermediate_size", where)
    if intermediate % d_model:
        raise CheckpointError(
            f"{where}.intermediate_size {intermediate} is not a multiple of hidden_size {d_model}"
        )
    # sliding_window is the left context plus the current frame.
    left = _field(enc, "sliding_window", int, where, minimum=2) - 1
    rights = _lookaheads(
        enc, processor, _field(enc, "default_num_lookahead_tokens", int, where, minimum=0)
    )
    encoder = {
        "feat_in": _size(enc, "num_mel_bins", where),
        "n_layers": _size(enc, "num_hidden_layers", where),
        "d_model": d_model,
        "n_heads": _size(enc, "num_attention_heads", where),
        "ff_expansion_factor": intermediate // d_model,
        "subsampling": "dw_striding",
        "subsampling_factor": _size(enc, "subsampling_factor", where),
        "subsampling_conv_channels": _size(enc, "subsampling_conv_channels", where),
        "causal_downsampling": True,
        "self_attention_model": "rel_pos",
        "att_context_size": [[left, right] for right in rights],
        "att_context_style": "chunked_limited",
        "xscaling": _field(enc, "scale_input", bool, where),
        "use_bias": use_bias,
        "untie_biases": True,
        "pos_emb_max_len": _size(enc, "max_position_embeddings", where),
        "conv_kernel_size": _size(enc, "conv_kernel_size", where),
        "conv_norm_type": "layer_norm",
        "conv_context_size": "causal",
    }
    for hf_key, nemo_key in (("dropout", "dropout"), ("attention_dropout", "dropout_att")):
        if hf_key in enc:
            encoder[nemo_key] = _field(enc, hf_key, float, where)
    return encoder


def _lookaheads(enc: dict[str, Any], processor: dict[str, Any], default: int) -> list[int]:
    """The trained right contexts, the default first (NeMo's att_context_size order).

    The converter writes them to the processor config and to the encoder config.
    """
    rights = [default]
    for section, where in ((enc, f"{CONFIG_FILE} encoder_config"), (processor, PROCESSOR_FILE)):
        if "supported_num_lookahead_tokens" in section:
            rights = _field(section, "supported_num_lookahead_tokens", list, where)
            if not all(type(r) is int for r in rights):
                raise CheckpointError(f"{where}.supported_num_lookahead_tokens is {rights!r}")
            break
    if default not in rights:
        raise CheckpointError(
            f"default_num_lookahead_tokens {default} is not a supported lookahead {rights}"
        )
    return [default] + [r for r in rights if r != default]


def _nemo_preprocessor(processor: dict[str, Any]) -> dict[str, Any]:
    """NeMo's preprocessor section; empty (NeMo's defaults) without a feature extractor.

    HF's `NemotronAsrStreamingFeatureExtractor` hard-codes what NeMo's
    `FilterbankFeatures` has as options: symmetric Hann window, slaney mel
    filterbank from 0 Hz to Nyquist, |X|^2, log guard 2**-24, no normalisation,
    so those keep their NeMo defaults.
    """
    fe = processor.get("feature_extractor")
    if fe is None:
        return {}
    where = f"{PROCESSOR_FILE} feature_extractor"
    if not isinstance(fe, dict):
        raise CheckpointError(f"{where} is a {type(fe).__name__}, not an object")
    kind = _field(fe, "feature_extractor_type", str, where, FEATURE_EXTRACTOR_TYPE)
    if kind != FEATURE_EXTRACTOR_TYPE:
        # Parakeet's extractor, for one, normalizes each feature: another front end.
        raise CheckpointError(f"{where} is a {kind}; caster computes {FEATURE_EXTRACTOR_TYPE}'s")
    dtype = _field(fe, "mel_filters_dtype", str, where, "float32")
    if dtype != "float32":
        # HF then rounds the filterbank and window to that dtype; caster's front end is fp32.
        raise CheckpointError(f"{where}.mel_filters_dtype is {dtype!r}; caster supports float32")
    sample_rate = _size(fe, "sampling_rate", where)
    return {
        "sample_rate": sample_rate,
        "window_size": _size(fe, "win_length", where) / sample_rate,
        "window_stride": _size(fe, "hop_length", where) / sample_rate,
        "n_fft": _size(fe, "n_fft", where),
        "features": _size(fe, "feature_size", where),
        "preemph": _field(fe, "preemphasis", float, where),
        "pad_value": _field(fe, "padding_value", float, where),
    }


def _size(section: dict[str, Any], key: str, where: str, default: Any = _REQUIRED) -> int:
    """A positive integer field."""
    return _field(section, key, int, where, default, minimum=1)


# ---------------------------------------------------------------- weights


def _rename(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under NeMo's names; raises for names outside `_HF_TO_NEMO`."""
    renamed: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in hf_state.items():
        for pattern, replacement in _HF_TO_NEMO_COMPILED:
            if pattern.fullmatch(key):
                renamed[pattern.sub(replacement, key)] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{WEIGHTS_FILE} has tensors caster does not know: {_names(unknown)}")
    return renamed


def _conform(
    state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Check names and shapes against the config; give pointwise convs NeMo's shape."""
    if missing := [k for k in expected if k not in state]:
        raise CheckpointError(f"{WEIGHTS_FILE} lacks tensors: {_names(missing)}")
    if extra := [k for k in state if k not in expected]:
        raise CheckpointError(
            f"{WEIGHTS_FILE} has tensors that {CONFIG_FILE} does not describe (as NeMo names): "
            f"{_names(extra)}"
        )
    out = {}
    for key, shape in expected.items():
        tensor = state[key]
        got = tuple(tensor.shape)
        if got != shape:
            # A k=1 convolution stored as a Linear ([2048, 1024] for NeMo's
            # [2048, 1024, 1]) holds the same numbers: only the trailing 1s differ.
            if got == shape[: len(got)] and all(d == 1 for d in shape[len(got) :]):
                tensor = tensor.reshape(shape)
            else:
                raise CheckpointError(
                    f"tensor {key!r} has shape {list(got)}; the config implies {list(shape)}"
                )
        out[key] = tensor
    return out


def _expected_shapes(config: ModelConfig, prompt_hidden: int | None) -> dict[str, tuple[int, ...]]:
    """Every tensor of this architecture, NeMo name -> shape (architecture.md §5.2)."""
    enc, dec = config.encoder, config.decoder
    d, c, bias = enc.d_model, enc.subsampling_conv_channels, enc.use_bias
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out_features: int, in_features: int, with_bias: bool = True) -> None:
        shapes[f"{name}.weight"] = (out_features, in_features)
        if with_bias:
            shapes[f"{name}.bias"] = (out_features,)

    def conv(name: str, shape: tuple[int, ...], with_bias: bool) -> None:
        shapes[f"{name}.weight"] = shape
        if with_bias:
            shapes[f"{name}.bias"] = (shape[0],)

    def norm(name: str) -> None:
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (d,)

    conv("encoder.pre_encode.conv.0", (c, 1, 3, 3), True)
    for stage in range(1, enc.num_subsampling_stages):
        conv(f"encoder.pre_encode.conv.{3 * stage - 1}", (c, 1, 3, 3), True)
        conv(f"encoder.pre_encode.conv.{3 * stage}", (c, c, 1, 1), True)
    linear("encoder.pre_encode.out", d, c * enc.subsampled_feat)
    for i in range(enc.n_layers):
        layer = f"encoder.layers.{i}"
        for name in ("norm_feed_forward1", "norm_self_att", "norm_conv", "norm_feed_forward2"):
            norm(f"{layer}.{name}")
        for ff in ("feed_forward1", "feed_forward2"):
            linear(f"{layer}.{ff}.linear1", d * enc.ff_expansion_factor, d, bias)
            linear(f"{layer}.{ff}.linear2", d, d * enc.ff_expansion_factor, bias)
        for proj in ("linear_q", "linear_k", "linear_v", "linear_out"):
            linear(f"{layer}.self_attn.{proj}", d, d, bias)
        linear(f"{layer}.self_attn.linear_pos", d, d, with_bias=False)
        shapes[f"{layer}.self_attn.pos_bias_u"] = (enc.n_heads, enc.d_head)
        shapes[f"{layer}.self_attn.pos_bias_v"] = (enc.n_heads, enc.d_head)
        conv(f"{layer}.conv.pointwise_conv1", (2 * d, d, 1), bias)
        conv(f"{layer}.conv.depthwise_conv", (d, 1, enc.conv_kernel_size), bias)
        norm(f"{layer}.conv.batch_norm")  # a LayerNorm: HF's model has no BatchNorm variant
        conv(f"{layer}.conv.pointwise_conv2", (d, d, 1), bias)
        norm(f"{layer}.norm_out")

    outputs, hidden = dec.vocab_size + 1, dec.pred_hidden
    shapes["decoder.prediction.embed.weight"] = (outputs, hidden)
    for n in range(dec.pred_rnn_layers):
        lstm = "decoder.prediction.dec_rnn.lstm"
        shapes[f"{lstm}.weight_ih_l{n}"] = shapes[f"{lstm}.weight_hh_l{n}"] = (4 * hidden, hidden)
        shapes[f"{lstm}.bias_ih_l{n}"] = shapes[f"{lstm}.bias_hh_l{n}"] = (4 * hidden,)
    linear("joint.pred", dec.joint_hidden, hidden)
    linear("joint.enc", dec.joint_hidden, d)
    linear("joint.joint_net.2", outputs, dec.joint_hidden)
    if config.prompt is not None:
        assert prompt_hidden is not None
        linear("prompt_kernel.0", prompt_hidden, d + config.prompt.num_prompts)
        linear("prompt_kernel.2", d, prompt_hidden)
    return shapes


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
