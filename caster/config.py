"""Typed model configuration, translated once from a checkpoint's config.

Every hyper-parameter the model uses lives here. `ModelConfig.from_nemo` reads
the `model_config.yaml` of a `.nemo` archive; `to_dict`/`from_dict` give the
JSON form that caster's own checkpoint format stores. Nothing here holds
per-stream state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# The latencies the released models advertise, in milliseconds.
STANDARD_CHUNK_MS = (80, 160, 320, 560, 1120)


class ConfigError(ValueError):
    """A checkpoint's configuration describes something caster cannot build."""


@dataclass(frozen=True)
class MelConfig:
    sample_rate: int = 16000
    win_length: int = 400  # samples in the analysis window (25 ms)
    hop_length: int = 160  # samples between frames (10 ms)
    n_fft: int = 512
    n_mels: int = 128
    preemph: float | None = 0.97  # None: no pre-emphasis
    log_zero_guard_value: float = 2.0**-24  # added before log()
    mag_power: float = 2.0
    pad_value: float = 0.0  # value of frames past the valid length
    lowfreq: float = 0.0
    highfreq: float | None = None  # None: sample_rate / 2
    mel_norm: str | None = "slaney"


@dataclass(frozen=True)
class EncoderConfig:
    feat_in: int = 128
    n_layers: int = 24
    d_model: int = 1024
    n_heads: int = 8
    ff_expansion_factor: int = 4
    subsampling_factor: int = 8
    subsampling_conv_channels: int = 256
    conv_kernel_size: int = 9
    conv_norm_type: str = "layer_norm"  # "layer_norm" or "batch_norm"
    # (left, right) attention context in encoder frames; the first is the default.
    att_context_size: tuple[tuple[int, int], ...] = ((56, 3), (56, 0), (56, 6), (56, 13))
    # Training-time sampling weights of att_context_size (None: uniform).
    att_context_probs: tuple[float, ...] | None = None
    xscaling: bool = False  # multiply the subsampled input by sqrt(d_model)
    use_bias: bool = False  # biases on the attention, feed-forward and conv-module layers
    pos_emb_max_len: int = 5000
    dropout: float = 0.1
    dropout_pre_encoder: float = 0.1
    dropout_att: float = 0.1

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def conv_cache_size(self) -> int:
        """Frames of depthwise-conv input carried between chunks (causal kernel - 1)."""
        return self.conv_kernel_size - 1

    @property
    def subsampled_feat(self) -> int:
        """Frequency bins left after the causal stride-2 convolutions (128 -> 17)."""
        f = self.feat_in
        for _ in range(self.num_subsampling_stages):
            f = f // 2 + 1
        return f

    @property
    def num_subsampling_stages(self) -> int:
        return self.subsampling_factor.bit_length() - 1


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int = 13087  # tokens, not counting the blank (blank id == vocab_size)
    pred_hidden: int = 640
    pred_rnn_layers: int = 2
    joint_hidden: int = 640
    max_symbols: int = 10  # most labels the greedy decoder emits on one encoder frame
    dropout: float = 0.2

    @property
    def blank_id(self) -> int:
        return self.vocab_size


@dataclass(frozen=True)
class PromptConfig:
    num_prompts: int = 128
    # locale or short form -> prompt index, exactly as the checkpoint lists it
    dictionary: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelConfig:
    mel: MelConfig = field(default_factory=MelConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    prompt: PromptConfig | None = None

    @property
    def default_context(self) -> tuple[int, int]:
        return self.encoder.att_context_size[0]

    @property
    def encoder_frame_ms(self) -> int:
        """Duration of one encoder frame: `subsampling_factor` mel hops (80 ms in the family)."""
        return round(
            self.encoder.subsampling_factor * self.mel.hop_length * 1000 / self.mel.sample_rate
        )

    def context_for_chunk_ms(self, chunk_ms: int | None) -> tuple[int, int]:
        """The (left, right) attention context that gives `chunk_ms` latency.

        None means the model's default context (the first of its list). A chunk
        is R+1 encoder frames; a trained context with that chunk is used as it
        is (its left context may differ from the default's), any other chunk
        gets the default left context, which must be a whole number of chunks.
        """
        if chunk_ms is None:
            return self.default_context
        supported = self.supported_chunk_ms()
        if chunk_ms not in supported:
            raise ValueError(
                f"chunk_ms={chunk_ms} is not possible for this model (left context "
                f"{self.default_context[0]} frames); supported chunk sizes: "
                + ", ".join(f"{ms} ms" for ms in supported)
            )
        right = chunk_ms // self.encoder_frame_ms - 1
        for context in self.encoder.att_context_size:
            if context[1] == right:
                return context
        return self.default_context[0], right

    def supported_chunk_ms(self) -> list[int]:
        frame, left = self.encoder_frame_ms, self.default_context[0]
        trained = {(r + 1) * frame for _, r in self.encoder.att_context_size}
        standard = {ms for ms in STANDARD_CHUNK_MS if ms % frame == 0 and left % (ms // frame) == 0}
        return sorted(trained | standard)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        try:
            enc = dict(d["encoder"])
            enc["att_context_size"] = tuple(tuple(c) for c in enc["att_context_size"])
            if enc.get("att_context_probs") is not None:
                enc["att_context_probs"] = tuple(enc["att_context_probs"])
            prompt = d.get("prompt")
            return cls(
                mel=MelConfig(**d["mel"]),
                encoder=EncoderConfig(**enc),
                decoder=DecoderConfig(**d["decoder"]),
                prompt=None if prompt is None else PromptConfig(**prompt),
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"malformed caster model config: {e}") from e

    @classmethod
    def from_nemo(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Translate a NeMo `model_config.yaml` (already parsed) into a ModelConfig.

        Raises ConfigError for architectures outside the cache-aware
        FastConformer-RNNT family.
        """
        try:
            return _from_nemo(cfg)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"unsupported or malformed NeMo config: {e!r}") from e


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise ConfigError(f"unsupported NeMo model: {what}")


def _from_nemo(cfg: dict[str, Any]) -> ModelConfig:
    pre, enc, dec, joint = cfg["preprocessor"], cfg["encoder"], cfg["decoder"], cfg["joint"]
    sr = int(pre.get("sample_rate", 16000))
    _require(pre.get("normalize", "NA") not in ("per_feature", "all_features"), "feature norm")
    _require(int(pre.get("frame_splicing", 1)) == 1, "frame_splicing != 1")
    _require(pre.get("log", True) is True, "log=False features")
    _require(pre.get("log_zero_guard_type", "add") == "add", "log_zero_guard_type != add")
    _require(pre.get("window", "hann") == "hann", f"window {pre.get('window')!r}")
    _require(not pre.get("exact_pad", False), "exact_pad=True")
    guard = pre.get("log_zero_guard_value", 2.0**-24)
    _require(isinstance(guard, int | float), "non-numeric log_zero_guard_value")
    mel = MelConfig(
        sample_rate=sr,
        win_length=round(float(pre.get("window_size", 0.025)) * sr),
        hop_length=round(float(pre.get("window_stride", 0.01)) * sr),
        n_fft=int(pre.get("n_fft", 512)),
        n_mels=int(pre.get("features", 128)),
        preemph=None if pre.get("preemph", 0.97) is None else float(pre.get("preemph", 0.97)),
        log_zero_guard_value=float(guard),
        mag_power=float(pre.get("mag_power", 2.0)),
        pad_value=float(pre.get("pad_value", 0.0)),
        lowfreq=float(pre.get("lowfreq", 0.0) or 0.0),
        highfreq=None if pre.get("highfreq") is None else float(pre["highfreq"]),
        mel_norm=pre.get("mel_norm", "slaney"),
    )

    _require(enc.get("self_attention_model", "rel_pos") == "rel_pos", "attention model")
    _require(enc.get("subsampling", "dw_striding") == "dw_striding", "subsampling type")
    _require(bool(enc.get("causal_downsampling", False)), "non-causal subsampling")
    factor = int(enc.get("subsampling_factor", 8))
    _require(factor in (2, 4, 8, 16), f"subsampling_factor {factor}")
    _require(enc.get("att_context_style", "regular") == "chunked_limited", "att_context_style")
    _require(enc.get("untie_biases", True) is True, "untie_biases=False")
    _require(enc.get("reduction") is None, "time reduction")
    _require(int(enc.get("feat_out", -1)) == -1, "feat_out projection")
    kernel = int(enc.get("conv_kernel_size", 9))
    conv_ctx = enc.get("conv_context_size", "causal")
    _require(conv_ctx == "causal" or list(conv_ctx) == [kernel - 1, 0], "conv context")
    norm = enc.get("conv_norm_type", "batch_norm")
    _require(norm in ("layer_norm", "batch_norm"), f"conv_norm_type {norm!r}")
    ctx = enc["att_context_size"]
    if ctx and isinstance(ctx[0], int):  # a single [left, right] pair
        ctx = [ctx]
    contexts = tuple((int(c[0]), int(c[1])) for c in ctx)
    for left, right in contexts:
        _require(left > 0 and right >= 0, f"att_context_size {[left, right]}")
        _require(left % (right + 1) == 0, f"att_context_size {[left, right]}")
    probs = enc.get("att_context_probs")
    d_model = int(enc["d_model"])
    encoder = EncoderConfig(
        feat_in=int(enc.get("feat_in", mel.n_mels)),
        n_layers=int(enc["n_layers"]),
        d_model=d_model,
        n_heads=int(enc["n_heads"]),
        ff_expansion_factor=int(enc.get("ff_expansion_factor", 4)),
        subsampling_factor=factor,
        subsampling_conv_channels=int(enc.get("subsampling_conv_channels", 256)),
        conv_kernel_size=kernel,
        conv_norm_type=norm,
        att_context_size=contexts,
        att_context_probs=None if probs is None else tuple(float(p) for p in probs),
        xscaling=bool(enc.get("xscaling", True)),
        use_bias=bool(enc.get("use_bias", True)),
        pos_emb_max_len=int(enc.get("pos_emb_max_len", 5000)),
        dropout=float(enc.get("dropout", 0.1)),
        dropout_pre_encoder=float(enc.get("dropout_pre_encoder", 0.1)),
        dropout_att=float(enc.get("dropout_att", 0.1)),
    )
    _require(encoder.feat_in == mel.n_mels, "encoder feat_in != mel features")
    _require(
        min(d_model, encoder.n_heads, encoder.n_layers, encoder.subsampling_conv_channels) > 0,
        "non-positive encoder sizes",
    )
    _require(d_model % encoder.n_heads == 0, "d_model not divisible by n_heads")

    prednet = dec["prednet"]
    jointnet = joint["jointnet"]
    _require(jointnet.get("activation", "relu") == "relu", "joint activation")
    _require(bool(dec.get("blank_as_pad", True)), "blank_as_pad=False")
    _require(not joint.get("num_extra_outputs"), "TDT/extra joint outputs")
    greedy = cfg.get("decoding", {}).get("greedy", {}) or {}
    max_symbols = greedy.get("max_symbols", greedy.get("max_symbols_per_step", 10))
    decoder = DecoderConfig(
        vocab_size=int(dec["vocab_size"]),
        pred_hidden=int(prednet["pred_hidden"]),
        pred_rnn_layers=int(prednet.get("pred_rnn_layers", 1)),
        joint_hidden=int(jointnet["joint_hidden"]),
        max_symbols=int(max_symbols if max_symbols is not None else 10),
        dropout=float(prednet.get("dropout", 0.2)),
    )
    _require(int(joint.get("num_classes", decoder.vocab_size)) == decoder.vocab_size, "vocab")

    defaults = cfg.get("model_defaults", {}) or {}
    prompt = None
    if defaults.get("initialize_prompt_feature"):
        # YAML 1.1 reads an unquoted `no` (Norwegian) as False: keep keys as strings.
        dictionary = {
            ("no" if k is False else str(k)): int(v)
            for k, v in (defaults.get("prompt_dictionary") or {}).items()
        }
        num_prompts = int(defaults.get("num_prompts", cfg.get("num_prompts", 128)))
        _require(all(0 <= v < num_prompts for v in dictionary.values()), "prompt index range")
        prompt = PromptConfig(num_prompts=num_prompts, dictionary=dictionary)
    return ModelConfig(mel=mel, encoder=encoder, decoder=decoder, prompt=prompt)
