"""Int8 weights for fast CPU inference: dynamic quantization of the large matrices.

`quantize_model(model)` returns a copy of a loaded model whose linear layers
(encoder attention and feed-forward, the pointwise convolutions, the
subsampling projection, the joint) and prediction LSTM run on int8 weights
(symmetric, one scale per output row) with activations quantized per call
(fbgemm's `linear_dynamic`; 8-bit where the CPU has VNNI, else 7-bit). On
CPU a single stream reads every weight once per chunk, so int8 weights cut
that traffic by 4; the float model stays as it is, and the two share every
tensor that is not quantized.

The quantized path is not exact: it changes the encoder output (0.3-0.4%
relative on the NeMo-built fixture models, about 3% on the random-weight
full-size preset) and may change tokens. `bench/bench_streaming.py` measures
both against float32. The language prompt projection stays float32 on purpose
(see `Transducer.apply_prompt`).
"""

from __future__ import annotations

import copy
import functools
import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from caster.encoder import PointwiseConv1d
from caster.transducer import Transducer

if TYPE_CHECKING:
    from caster.model import Model


@functools.cache
def full_range_activations() -> bool:
    """Whether this CPU can take 8-bit activations without overflow.

    fbgemm's int8 kernels for CPUs without VNNI instructions add pairs of
    u8 x s8 products in 16 bits, which full-range activations can saturate;
    PyTorch's default therefore uses 7-bit activations everywhere. With VNNI
    (AVX512-VNNI or AVX-VNNI) products accumulate in 32 bits, and the eighth
    bit halves the activation rounding error (measured: encoder relative error
    3.0% instead of 5.1% on the random-weight full-size preset). Unknown
    platforms keep the safe 7 bits.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


class QuantizationError(ValueError):
    """The model cannot be quantized (training mode, unsupported engine)."""


def _quantize_weight(weight: Tensor) -> Tensor:
    """(out, in) float -> per-row symmetric qint8."""
    w = weight.detach().float().contiguous()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
    zero = torch.zeros(w.shape[0], dtype=torch.long)
    # PyTorch marks its quantized tensor types deprecated (to move to torchao);
    # fbgemm's packed int8 linear is still the fastest int8 kernel in torch 2.13.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated", category=UserWarning)
        return torch.quantize_per_channel(w.cpu(), scale, zero, axis=0, dtype=torch.qint8)


class Int8Linear(nn.Module):
    """y = x W^T + b with W in int8 and x quantized per call. Inference only."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.reduce_range = not full_range_activations()
        b = None if bias is None else bias.detach().float().cpu().contiguous()
        try:
            self._packed = torch.ops.quantized.linear_prepack(_quantize_weight(weight), b)
        except RuntimeError as e:
            raise QuantizationError(
                f"int8 linear layers are not supported here "
                f"(quantized engine {torch.backends.quantized.engine!r}): {e}"
            ) from e

    @classmethod
    def from_float(cls, module: nn.Linear | PointwiseConv1d) -> Int8Linear:
        weight = module.weight[..., 0] if isinstance(module, PointwiseConv1d) else module.weight
        return cls(weight, module.bias)

    @property
    def weight(self) -> Tensor:
        """The effective (out, in) float32 weight, dequantized on each access.

        For code that reads a layer's `weight.dtype` or `.device` (the engine
        does); the forward pass never materialises it.
        """
        qweight, _ = torch.ops.quantized.linear_unpack(self._packed)
        return qweight.dequantize()

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) float32 -> (..., out_features) float32."""
        return torch.ops.quantized.linear_dynamic(x.contiguous(), self._packed, self.reduce_range)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8LSTM(nn.Module):
    """A batch-first multi-layer `nn.LSTM` (gates i, f, g, o) with int8 weights.

    Same call and result layout as the float LSTM it replaces: (B, U, H) input,
    optional (h, c) each (layers, B, H). Inference only (no inter-layer dropout).
    """

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        if not lstm.batch_first or lstm.bidirectional or lstm.proj_size or not lstm.bias:
            raise QuantizationError("only batch-first, unidirectional LSTMs with biases")
        self.hidden_size, self.num_layers = lstm.hidden_size, lstm.num_layers
        self.input_layers = nn.ModuleList(
            Int8Linear(getattr(lstm, f"weight_ih_l{n}"), getattr(lstm, f"bias_ih_l{n}"))
            for n in range(lstm.num_layers)
        )
        self.hidden_layers = nn.ModuleList(
            Int8Linear(getattr(lstm, f"weight_hh_l{n}"), getattr(lstm, f"bias_hh_l{n}"))
            for n in range(lstm.num_layers)
        )

    def forward(
        self, x: Tensor, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        batch, steps, _ = x.shape
        if state is None:
            zeros = x.new_zeros(self.num_layers, batch, self.hidden_size)
            state = (zeros, zeros)
        h_out, c_out = [], []
        for n in range(self.num_layers):
            h, c = state[0][n], state[1][n]  # (B, H)
            projected = self.input_layers[n](x)  # (B, U, 4H): every step's input at once
            outputs = []
            for u in range(steps):
                i, f, g, o = (projected[:, u] + self.hidden_layers[n](h)).chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outputs.append(h)
            x = torch.stack(outputs, dim=1)  # (B, U, H)
            h_out.append(h)
            c_out.append(c)
        return x, (torch.stack(h_out), torch.stack(c_out))


def _quantized_copy(module: nn.Module, keep: set[int]) -> nn.Module:
    """A copy of `module` with its large matrices quantized, sharing everything else."""
    if id(module) not in keep:
        if isinstance(module, nn.Linear | PointwiseConv1d):
            return Int8Linear.from_float(module)
        if isinstance(module, nn.LSTM):
            return Int8LSTM(module)
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = {
        name: None if child is None else _quantized_copy(child, keep)
        for name, child in module._modules.items()
    }
    return new


def quantize_transducer(net: Transducer) -> Transducer:
    """An int8 copy of `net` for CPU inference; `net` itself is left unchanged.

    Quantized: every nn.Linear, pointwise convolution and the LSTM, except the
    language prompt projection. Kept float: norms, the depthwise and
    subsampling convolutions, the label embedding, position biases.
    """
    if net.training:
        raise QuantizationError("quantize a model in eval mode (quantized layers cannot train)")
    if net.device.type != "cpu":
        raise QuantizationError(f"int8 kernels run on the CPU; this model is on {net.device}")
    if net.encoder.dtype != torch.float32:
        raise QuantizationError(f"int8 weights are made from float32, not {net.encoder.dtype}")
    keep = {id(m) for m in net.prompt_kernel.modules()} if hasattr(net, "prompt_kernel") else set()
    quantized = _quantized_copy(net, keep)
    assert isinstance(quantized, Transducer)
    return quantized


def quantize_model(model: Model) -> Model:
    """A copy of a loaded `Model` whose network is `quantize_transducer(model.net)`.

    The copy shares the tokenizer, config and every float tensor with `model`,
    so it costs only the int8 weights (about a quarter of the float size).
    """
    quantized = copy.copy(model)
    quantized.net = quantize_transducer(model.net)
    return quantized
