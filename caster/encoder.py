"""Cache-aware FastConformer encoder: causal subsampling, rel-pos attention, causal conv.

One readable file for the whole encoder. Attribute names mirror NeMo's state_dict
keys (`encoder.pre_encode.conv.0.weight`, `encoder.layers.3.self_attn.linear_q.weight`,
...), so a `.nemo` checkpoint loads after stripping nothing at all.

The encoder is a pure function of (weights, input, state):
- `forward(mel, lengths, context)` encodes whole utterances with the chunked-limited
  attention mask of `context`, which is what streaming at that latency computes;
- `step(mel_chunk, lengths, cache, context)` encodes the next chunk of a batch of
  streams and returns their new `EncoderCache`. The model never stores stream state.

The encoder runs in its weights' dtype (float32, or bf16/fp16 for `caster.load(...,
dtype=...)`): mel input is cast on entry, and its caches are kept in that dtype.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from caster.config import EncoderConfig

# Position tables for at most this many keys (left + chunk) are shared between
# calls: streaming sizes, never whole long utterances.
SHARED_POSITIONS_MAX_KEYS = 256


@dataclass(frozen=True)
class EncoderCache:
    """What one chunk leaves for the next, per stream (batch first).

    mel:            (B, F, f+1) last mel frames, right-aligned; the subsampling
                    convolutions re-read them so the next chunk's first frames are exact
    mel_len:        (B,) how many of those are real (fewer only at the stream start)
    attention:      (B, L, left, D) each layer's attention input (norm_self_att output)
                    for the last `left` frames, right-aligned
    attention_len:  (B,) how many of those slots hold real frames (the rest are masked)
    conv:           (B, L, D, k-1) each layer's depthwise-conv input for the last k-1 frames
    """

    mel: Tensor
    mel_len: Tensor
    attention: Tensor
    attention_len: Tensor
    conv: Tensor


def subsampled_length(lengths: Tensor | int, stages: int) -> Tensor | int:
    """Frames after `stages` causal stride-2 convolutions: L -> L//2 + 1 each (0 stays 0)."""
    out = lengths
    for _ in range(stages):
        out = out // 2 + 1
    if isinstance(lengths, int):
        return out if lengths > 0 else 0
    return torch.where(lengths > 0, out, torch.zeros_like(out))


def _shareable(like: Tensor) -> bool:
    """Whether a table computed for `like` may be shared between calls.

    Not while autograd records (a shared tensor made under inference mode cannot
    enter autograd), and not while a CUDA graph is being captured: the graph
    would keep reading a shared table's memory after a cache has dropped it, so
    tables are computed inside the graph instead.
    """
    if torch.is_grad_enabled():
        return False
    return not (like.is_cuda and torch.cuda.is_current_stream_capturing())


def _time_mask(lengths: Tensor, size: int) -> Tensor:
    """(B, size) True where the time index is below the length."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def _tail(seq: Tensor, end: Tensor, n: int, dim: int) -> Tensor:
    """Per batch item b, the n entries of `seq` along `dim` ending (exclusive) at end[b]."""
    index = end[:, None] - n + torch.arange(n, device=seq.device)[None, :]  # (B, n)
    shape = [1] * seq.dim()
    shape[0], shape[dim] = seq.shape[0], n
    index = index.view(shape).expand(*[n if d == dim else s for d, s in enumerate(seq.shape)])
    return torch.gather(seq, dim, index)


# The fresh front end's affine map of log-mel values: x / 4.6 + 4 stays positive through its
# ReLUs down to log(2^-24) = -16.6 (the mel floor), and -4.2 is a typical log-mel value.
SPACE_TO_DEPTH_SCALE = 1 / 4.6
SPACE_TO_DEPTH_SHIFT = 4.0
TYPICAL_LOG_MEL = -4.2


def _start_as_space_to_depth(conv: nn.Sequential, out: nn.Linear, stages: int) -> None:
    """Start a fresh subsampling front as space-to-depth: the first n*n channels (n = 2^stages)
    carry the log-mel pixels of each n x n patch, the output Linear sees them all.

    Channel n*dt + df of output cell (k, j) is mel pixel (n*k - n + 1 + dt, n*j - n + 1 + df)
    (causal padding), scaled and shifted to stay positive through the ReLUs: each stride-2
    stage picks one bit of (dt, df) with a single tap; the pointwise convs start as the
    identity. With PyTorch's random init this front end held caster's encoder on the CTC
    blank plateau from scratch (en-US, 12 s batches, lr 3e-4: greedy CER 0.94-0.98 at 3,000
    steps on two seeds, where 8 stacked mel frames reached 0.83); this start together with
    the trainer's centred output Linear (`caster.train.centering`) left it (0.84-0.88), either
    alone did not. Other channels keep PyTorch's init; loaded checkpoints overwrite it all.
    """
    n = 2**stages
    strided = [m for m in conv if isinstance(m, nn.Conv2d) and m.stride[0] == 2]
    pointwise = [m for m in conv if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    cells = torch.arange(n * n)
    dt, df = cells // n, cells % n
    for stage, module in enumerate(strided):
        module.weight[: n * n] = 0.0  # (C, 1, 3, 3): one tap per channel
        taps_t, taps_f = 1 + (dt >> stage) % 2, 1 + (df >> stage) % 2
        module.weight[cells, 0, taps_t, taps_f] = SPACE_TO_DEPTH_SCALE if stage == 0 else 1.0
        module.bias[: n * n] = SPACE_TO_DEPTH_SHIFT if stage == 0 else 0.0
    for module in pointwise:
        module.weight[: n * n] = 0.0  # (C, C, 1, 1)
        module.weight[cells, cells, 0, 0] = 1.0
        module.bias[: n * n] = 0.0
    # Centre the Linear's inputs on a typical value: their offset (4 - 4.2/4.6 = 3.1 per
    # feature) would otherwise dominate every output.
    offset = SPACE_TO_DEPTH_SHIFT + TYPICAL_LOG_MEL * SPACE_TO_DEPTH_SCALE
    features = n * n * out.in_features // conv[0].out_channels  # inputs c*F' + f with c < n*n
    out.bias.copy_(-offset * out.weight[:, :features].sum(1))


class ConvSubsampling(nn.Module):
    """Causal depthwise-striding subsampling: (B, T, F) mel -> (B, T/f, D)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        c = cfg.subsampling_conv_channels
        layers: list[nn.Module] = [nn.Conv2d(1, c, 3, stride=2), nn.ReLU()]
        for _ in range(cfg.num_subsampling_stages - 1):
            layers += [nn.Conv2d(c, c, 3, stride=2, groups=c), nn.Conv2d(c, c, 1), nn.ReLU()]
        self.conv = nn.Sequential(*layers)
        self.out = nn.Linear(c * cfg.subsampled_feat, cfg.d_model)
        if c >= 4**cfg.num_subsampling_stages:
            with torch.no_grad():
                _start_as_space_to_depth(self.conv, self.out, cfg.num_subsampling_stages)

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x = x.unsqueeze(1)  # (B, 1, T, F): conv height is time, width is frequency
        for module in self.conv:
            # NeMo masks the activations by length before every module, so
            # padding never leaks into valid frames through biases.
            x = x * _time_mask(lengths, x.shape[2])[:, None, :, None].to(x.dtype)
            if isinstance(module, nn.Conv2d) and module.stride[0] == 2:
                # Causal padding on time AND frequency: left k-1 = 2, right s-1 = 1.
                x = module(F.pad(x, (2, 1, 2, 1)))
                lengths = lengths // 2 + 1
            else:
                x = module(x)
        x = x * _time_mask(lengths, x.shape[2])[:, None, :, None].to(x.dtype)
        b, c, t, f = x.shape
        x = x.transpose(1, 2).reshape(b, t, c * f)  # (B, T', C*F'), feature index c*F' + f
        return self.out(x), lengths


def relative_positions(length: int, d_model: int, device: torch.device) -> Tensor:
    """Sinusoids for relative positions length-1 ... -(length-1): (1, 2*length-1, D).

    Computed elementwise in float32 exactly as NeMo's RelPositionalEncoding table,
    whose rows do not depend on the table size.
    """
    positions = torch.arange(length - 1, -length, -1, dtype=torch.float32, device=device)
    div_term = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32, device=device)
        * -(math.log(10000.0) / d_model)
    )
    pe = torch.zeros(positions.shape[0], d_model, device=device)
    pe[:, 0::2] = torch.sin(positions[:, None] * div_term)
    pe[:, 1::2] = torch.cos(positions[:, None] * div_term)
    return pe.unsqueeze(0)


@functools.lru_cache(maxsize=8)
def _shared_relative_positions(
    length: int, d_model: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """`relative_positions` memoised for streaming steps; callers never modify it."""
    return relative_positions(length, d_model, device).to(dtype)


def attention_context_mask(size: int, context: tuple[int, int], device: torch.device) -> Tensor:
    """(size, size) True where query i may attend to key j (chunked-limited style).

    Chunks are right+1 frames; a query sees its whole chunk and `left // (right+1)`
    chunks before it. -1 means unlimited, as in NeMo.
    """
    left, right = context
    pos = torch.arange(size, device=device)
    if right == -1:
        visible = torch.ones(size, size, dtype=torch.bool, device=device)
        return visible if left < 0 else (pos[None, :] >= pos[:, None] - left)
    chunk = right + 1
    left_chunks = left // chunk if left >= 0 else 10000
    idx = pos // chunk
    diff = idx[:, None] - idx[None, :]
    return (diff >= 0) & (diff <= left_chunks)


def rel_shift(x: Tensor) -> Tensor:
    """Transformer-XL shift: (B, H, T, P) scores by position row -> by relative distance."""
    b, h, t, p = x.shape
    x = F.pad(x, (1, 0))  # (B, H, T, P+1)
    x = x.view(b, h, p + 1, t)  # (B, H, P+1, T)
    return x[:, :, 1:].reshape(b, h, t, p)


class RelPositionMultiHeadAttention(nn.Module):
    # Projected position tables kept per layer: streaming steps of one chunk size
    # all use the same relative positions, so `linear_pos` (a (2K-1) x D x D
    # product, as costly as the rest of the layer at small chunks) runs once per
    # size. Bounded in entries and in length (SHARED_POSITIONS_MAX_KEYS); holds
    # no stream state.
    POSITION_CACHE_ENTRIES = 4

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        d, h = cfg.d_model, cfg.n_heads
        self.n_heads, self.d_head, self.dropout = h, cfg.d_head, cfg.dropout_att
        self.linear_q = nn.Linear(d, d, bias=cfg.use_bias)
        self.linear_k = nn.Linear(d, d, bias=cfg.use_bias)
        self.linear_v = nn.Linear(d, d, bias=cfg.use_bias)
        self.linear_out = nn.Linear(d, d, bias=cfg.use_bias)
        self.linear_pos = nn.Linear(d, d, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(h, cfg.d_head))
        self.pos_bias_v = nn.Parameter(torch.zeros(h, cfg.d_head))
        self._position_cache: dict[tuple, Tensor] = {}

    def projected_positions(self, pos_emb: Tensor) -> Tensor:
        """`linear_pos` of `relative_positions(K)` per head, transposed: (H, Dh, 2K-1).

        Cached when `_shareable` (no gradient recorded, no CUDA graph being
        captured). The key holds the identity and
        version of every weight of `linear_pos`, so new or edited weights are
        never served stale tables (a quantized `linear_pos` has no mutable
        weights; weights made under inference mode have no version counter, so
        only their replacement is seen). The cache dict is replaced, never
        mutated, so concurrent callers need no lock (a race only recomputes).
        """
        n, h, dh = pos_emb.shape[1], self.n_heads, self.d_head
        if not _shareable(pos_emb) or (n + 1) // 2 > SHARED_POSITIONS_MAX_KEYS:
            return self.linear_pos(pos_emb)[0].view(n, h, dh).permute(1, 2, 0)
        weights = tuple(
            (p.data_ptr(), None if p.is_inference() else p._version)
            for p in self.linear_pos.parameters()
        )
        key = (n, pos_emb.dtype, pos_emb.device, weights)
        cache = self._position_cache
        table = cache.get(key)
        if table is None:
            table = self.linear_pos(pos_emb)[0].view(n, h, dh).permute(1, 2, 0).contiguous()
        elif next(reversed(cache)) == key:
            return table
        # Least recently used first; the newest entry last.
        entries = [(k, v) for k, v in cache.items() if k != key]
        self._position_cache = dict([*entries[-(self.POSITION_CACHE_ENTRIES - 1) :], (key, table)])
        return table

    def forward(self, query: Tensor, keys: Tensor, pos_emb: Tensor, mask: Tensor) -> Tensor:
        """Attend from this chunk's frames to [cache; chunk].

        Args:
            query: (B, T, D) normalised frames of this chunk.
            keys: (B, K, D) normalised cached frames followed by `query` (K = cache + T).
            pos_emb: (1, 2K-1, D) `relative_positions(K)`: distances K-1 ... -(K-1).
            mask: (B, T, K) True where a key is hidden from a query.
        """
        b, t, _ = query.shape
        k_len, h, dh = keys.shape[1], self.n_heads, self.d_head
        q = self.linear_q(query).view(b, t, h, dh).transpose(1, 2)  # (B, H, T, Dh)
        k = self.linear_k(keys).view(b, k_len, h, dh).transpose(1, 2)  # (B, H, K, Dh)
        v = self.linear_v(keys).view(b, k_len, h, dh).transpose(1, 2)  # (B, H, K, Dh)
        p = self.projected_positions(pos_emb)  # (H, Dh, 2K-1)
        position = (q + self.pos_bias_v[:, None]) @ p  # (B, H, T, 2K-1)
        position = rel_shift(position)[..., :k_len]  # (B, H, T, K)
        scale = 1.0 / math.sqrt(dh)
        hidden = mask[:, None]  # (B, 1, T, K)
        # NeMo replaces hidden scores by -10000 before the softmax: exp of that
        # underflows to exactly 0 next to any visible score, as -inf does here.
        # Rows with no visible key are zeroed below, as NeMo's second masked_fill does.
        bias = (position * scale).masked_fill(hidden, float("-inf"))
        out = F.scaled_dot_product_attention(
            q + self.pos_bias_u[:, None],
            k,
            v,
            attn_mask=bias,
            dropout_p=self.dropout if self.training else 0.0,
            scale=scale,
        )  # (B, H, T, Dh)
        out = out.masked_fill(hidden.all(dim=-1, keepdim=True), 0.0)
        out = out.transpose(1, 2).reshape(b, t, h * dh)  # (B, T, D)
        return self.linear_out(out)


class ConformerFeedForward(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        hidden = cfg.d_model * cfg.ff_expansion_factor
        self.linear1 = nn.Linear(cfg.d_model, hidden, bias=cfg.use_bias)
        self.linear2 = nn.Linear(hidden, cfg.d_model, bias=cfg.use_bias)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor) -> Tensor:
        x = F.dropout(F.silu(self.linear1(x)), self.dropout, self.training)
        return self.linear2(x)


class PointwiseConv1d(nn.Module):
    """A kernel-1 Conv1d applied as a linear layer on (B, T, C) frames.

    The weight keeps Conv1d's (out, in, 1) shape, so NeMo's state_dict keys and
    shapes load unchanged; working batch-time-channel saves two transposes per
    layer, and `caster.quantize` can swap it for an int8 linear.
    """

    def __init__(self, channels_in: int, channels_out: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels_out, channels_in, 1))
        self.bias = nn.Parameter(torch.empty(channels_out)) if bias else None
        # Conv1d's default initialisation (fan_in = channels_in for a kernel of 1).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(channels_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, C_in) -> (B, T, C_out)."""
        return F.linear(x, self.weight[..., 0], self.bias)


class ConformerConvolution(nn.Module):
    """Pointwise conv + GLU, causal depthwise conv (with history), norm, Swish, pointwise."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.history = cfg.conv_cache_size
        self.pointwise_conv1 = PointwiseConv1d(d, 2 * d, bias=cfg.use_bias)
        self.depthwise_conv = nn.Conv1d(d, d, cfg.conv_kernel_size, groups=d, bias=cfg.use_bias)
        # NeMo names the norm `batch_norm` whatever its type.
        self.batch_norm = (
            nn.LayerNorm(d) if cfg.conv_norm_type == "layer_norm" else nn.BatchNorm1d(d)
        )
        self.pointwise_conv2 = PointwiseConv1d(d, d, bias=cfg.use_bias)

    def forward(self, x: Tensor, pad_mask: Tensor, history: Tensor | None) -> tuple[Tensor, Tensor]:
        """x: (B, T, D); pad_mask: (B, T) True on padding; history: (B, D, k-1) or None (zeros).

        Returns the output (B, T, D) and the depthwise input with its history
        (B, D, k-1+T), from which the caller takes the next history.
        """
        x = F.glu(self.pointwise_conv1(x), dim=-1)  # (B, T, D)
        x = x.masked_fill(pad_mask[..., None], 0.0).transpose(1, 2)  # (B, D, T)
        if history is None:
            history = x.new_zeros(x.shape[0], x.shape[1], self.history)
        conv_in = torch.cat([history, x], dim=2)  # (B, D, k-1+T)
        x = self.depthwise_conv(conv_in)  # (B, D, T)
        if isinstance(self.batch_norm, nn.LayerNorm):
            x = self.batch_norm(x.transpose(1, 2))  # (B, T, D): norm over channels
        else:
            x = self.batch_norm(x).transpose(1, 2)  # (B, T, D)
        return self.pointwise_conv2(F.silu(x)), conv_in


class ConformerLayer(nn.Module):
    """Macaron block: x + FF/2, + MHSA, + Conv, + FF/2, then LayerNorm."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.norm_feed_forward1 = nn.LayerNorm(d)
        self.feed_forward1 = ConformerFeedForward(cfg)
        self.norm_conv = nn.LayerNorm(d)
        self.conv = ConformerConvolution(cfg)
        self.norm_self_att = nn.LayerNorm(d)
        self.self_attn = RelPositionMultiHeadAttention(cfg)
        self.norm_feed_forward2 = nn.LayerNorm(d)
        self.feed_forward2 = ConformerFeedForward(cfg)
        self.norm_out = nn.LayerNorm(d)
        self.dropout = cfg.dropout

    def forward(
        self,
        x: Tensor,
        pos_emb: Tensor,
        att_mask: Tensor,
        pad_mask: Tensor,
        attention_cache: Tensor | None = None,
        conv_cache: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One layer over a chunk (or a whole utterance when the caches are None).

        Returns the output (B, T, D), the attention input with its cache
        (B, left+T, D) and the depthwise-conv input with its history (B, D, k-1+T).
        """
        drop = self.dropout
        x = x + 0.5 * F.dropout(self.feed_forward1(self.norm_feed_forward1(x)), drop, self.training)
        query = self.norm_self_att(x)
        keys = query if attention_cache is None else torch.cat([attention_cache, query], dim=1)
        x = x + F.dropout(self.self_attn(query, keys, pos_emb, att_mask), drop, self.training)
        conv_out, conv_in = self.conv(self.norm_conv(x), pad_mask, conv_cache)
        x = x + F.dropout(conv_out, drop, self.training)
        x = x + 0.5 * F.dropout(self.feed_forward2(self.norm_feed_forward2(x)), drop, self.training)
        return self.norm_out(x), keys, conv_in


class ConformerEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.pre_encode = ConvSubsampling(cfg)
        self.layers = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.n_layers))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the encoder computes in (read from a layer `caster.quantize` keeps float)."""
        return self.pre_encode.conv[0].weight.dtype

    @property
    def mel_cache_frames(self) -> int:
        """Mel frames a stream's cache holds once full (f+1; see `_subsample_step`)."""
        return self.cfg.subsampling_factor + 1

    def output_length(self, mel_lengths: Tensor) -> Tensor:
        return subsampled_length(mel_lengths, self.cfg.num_subsampling_stages)

    def _positions(self, length: int, x: Tensor) -> Tensor:
        """`relative_positions(length)` in x's dtype, shared between calls of one size.

        Only when `_shareable` and for streaming-sized lengths.
        """
        if not _shareable(x) or length > SHARED_POSITIONS_MAX_KEYS:
            return relative_positions(length, self.cfg.d_model, x.device).to(x.dtype)
        return _shared_relative_positions(length, self.cfg.d_model, x.device, x.dtype)

    def _embed(self, x: Tensor) -> Tensor:
        if self.cfg.xscaling:
            x = x * math.sqrt(self.cfg.d_model)
        return F.dropout(x, self.cfg.dropout_pre_encoder, self.training)

    def forward(
        self, mel: Tensor, lengths: Tensor, context: tuple[int, int] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Encode whole utterances.

        Args:
            mel: (B, F, T) log-mel features; lengths: (B,) valid frames.
            context: (left, right) attention context; None for the model's default.
        Returns:
            (B, T', D) encoder output and (B,) its valid lengths.
        """
        context = context or self.cfg.att_context_size[0]
        x, lengths = self.pre_encode(mel.transpose(1, 2).to(self.dtype), lengths)  # (B, T', D)
        x = self._embed(x)
        t = x.shape[1]
        pos_emb = self._positions(t, x)
        valid = _time_mask(lengths, t)  # (B, T')
        visible = (
            attention_context_mask(t, context, x.device)[None] & valid[:, None] & valid[..., None]
        )
        att_mask, pad_mask = ~visible, ~valid
        for layer in self.layers:
            x, _, _ = layer(x, pos_emb, att_mask, pad_mask)
        return x, lengths

    def initial_cache(
        self,
        batch: int,
        context: tuple[int, int],
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> EncoderCache:
        """Empty caches for `batch` new streams at attention context `context`.

        In the encoder's own dtype unless `dtype` is given.
        """
        cfg = self.cfg
        left = context[0]
        dtype = self.dtype if dtype is None else dtype
        return EncoderCache(
            mel=torch.zeros(batch, cfg.feat_in, self.mel_cache_frames, device=device, dtype=dtype),
            mel_len=torch.zeros(batch, dtype=torch.long, device=device),
            attention=torch.zeros(
                batch, cfg.n_layers, left, cfg.d_model, device=device, dtype=dtype
            ),
            attention_len=torch.zeros(batch, dtype=torch.long, device=device),
            conv=torch.zeros(
                batch, cfg.n_layers, cfg.d_model, cfg.conv_cache_size, device=device, dtype=dtype
            ),
        )

    def chunk_frames(self, context: tuple[int, int], first: bool) -> int:
        """Mel frames a streaming step consumes: 1 + f*R for the first chunk, f*(R+1) after."""
        f, right = self.cfg.subsampling_factor, context[1]
        return 1 + f * right if first else f * (right + 1)

    def _subsample_step(
        self, chunk: Tensor, lengths: Tensor, cache: EncoderCache, steady: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Subsample [cached mel ; new mel] for each stream, keeping only new encoder frames.

        The cached frames reach back far enough (f+1 frames) to recompute the
        causal convolutions exactly; the encoder frames they alone produce were
        emitted by the previous step and are dropped (2 for f = 8, as NeMo's
        drop_extra_pre_encoded). At the stream start the cache holds every frame
        seen so far, so the convolution's own zero padding is the true start.
        Streams are therefore subsampled in groups of equal cache fill, unless
        `steady` says every cache is full.
        """
        stages = self.cfg.num_subsampling_stages
        n_cache = cache.mel.shape[2]
        buffer = torch.cat([cache.mel, chunk], dim=2)  # (B, F, f+1+T)
        mel = _tail(buffer, n_cache + lengths, n_cache, dim=2)
        mel_len = torch.clamp(cache.mel_len + lengths, max=n_cache)
        if steady:  # one group, fixed shapes: no host synchronisation
            drop = subsampled_length(n_cache, stages)
            x, x_len = self.pre_encode(buffer.transpose(1, 2), lengths + n_cache)
            return x[:, drop:], x_len - drop, mel, mel_len
        pieces, piece_lengths, order = [], [], []
        for cached in torch.unique(cache.mel_len).tolist():
            idx = torch.nonzero(cache.mel_len == cached).squeeze(1)
            x, x_len = self.pre_encode(
                buffer[idx, :, n_cache - cached :].transpose(1, 2), lengths[idx] + cached
            )
            drop = subsampled_length(cached, stages)
            x, x_len = x[:, drop:], x_len - drop
            pieces.append(x[:, : int(x_len.max())])
            piece_lengths.append(x_len)
            order.append(idx)
        t_out = max(p.shape[1] for p in pieces)
        x = torch.cat([F.pad(p, (0, 0, 0, t_out - p.shape[1])) for p in pieces])
        x_len = torch.cat(piece_lengths)
        inverse = torch.argsort(torch.cat(order))
        return x[inverse], x_len[inverse], mel, mel_len

    def step(
        self,
        chunk: Tensor,
        lengths: Tensor,
        cache: EncoderCache,
        context: tuple[int, int],
        steady: bool = False,
    ) -> tuple[Tensor, Tensor, EncoderCache]:
        """Encode the next chunk of each stream in a batch.

        Args:
            chunk: (B, F, T) new mel frames; lengths: (B,) how many are real. A
                chunk is normally `chunk_frames(context, first)` frames, but any
                number works: several chunks at once, or the final remainder.
            cache: the streams' caches from `initial_cache` or the previous step.
            context: (left, right) attention context; left must equal the cache's.
            steady: the caller promises that every stream's mel cache is full
                (`mel_len == mel_cache_frames`, true from a stream's second chunk
                on, its third at right context 0). The step then has fixed shapes
                (T' = the frames of T mel frames; fewer valid ones are masked)
                and never synchronises with the host, so it can be captured in
                a CUDA graph (`caster.graphs`).
        Returns:
            (B, T', D) new encoder frames, (B,) their valid counts, and the new cache.
        """
        left = context[0]
        if cache.attention.shape[2] != left:
            raise ValueError(f"cache holds {cache.attention.shape[2]} frames, context is {context}")
        chunk = chunk.to(self.dtype)
        x, x_len, mel, mel_len = self._subsample_step(chunk, lengths, cache, steady)
        x = self._embed(x)
        t = x.shape[1]
        pos_emb = self._positions(left + t, x)
        # Unfilled cache slots sit at the front (the cache is right-aligned).
        pos = torch.arange(left + t, device=x.device)
        valid = (pos[None] >= (left - cache.attention_len)[:, None]) & (
            pos[None] < (left + x_len)[:, None]
        )  # (B, left+T)
        visible = (
            attention_context_mask(left + t, context, x.device)[None]
            & valid[:, None]
            & valid[..., None]
        )
        att_mask, pad_mask = ~visible[:, left:], ~valid[:, left:]  # queries: this chunk only
        history = self.cfg.conv_cache_size
        # Usually every stream fills the chunk: the new caches are then plain slices.
        full = not steady and bool((x_len == t).all())
        attention, conv = [], []
        for i, layer in enumerate(self.layers):
            x, keys, conv_in = layer(
                x, pos_emb, att_mask, pad_mask, cache.attention[:, i], cache.conv[:, i]
            )
            if full:
                attention.append(keys[:, t:])  # (B, left, D)
                conv.append(conv_in[:, :, t:])  # (B, D, k-1)
            else:
                attention.append(_tail(keys, left + x_len, left, dim=1))
                conv.append(_tail(conv_in, history + x_len, history, dim=2))
        new_cache = EncoderCache(
            mel=mel,
            mel_len=mel_len,
            attention=torch.stack(attention, dim=1),
            attention_len=torch.clamp(cache.attention_len + x_len, max=left),
            conv=torch.stack(conv, dim=1),
        )
        return x, x_len, new_cache
