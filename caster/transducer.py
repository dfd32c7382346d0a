"""The RNN-T model: mel front end, encoder, language prompt, prediction network and joint.

Attribute names mirror NeMo's state_dict keys (`decoder.prediction.dec_rnn.lstm.weight_ih_l0`,
`joint.joint_net.2.weight`, `prompt_kernel.0.weight`, `preprocessor.featurizer.fb`), so a
`.nemo` state_dict loads with `load_state_dict(strict=True)`.

`Transducer.set_dtype` runs the encoder and prediction network in bf16 or fp16; the
mel front end, the language prompt projection and the joint stay float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from caster.config import DecoderConfig, ModelConfig
from caster.encoder import ConformerEncoder
from caster.mel import Preprocessor

# The dtypes a network can run in, by their torch names and short forms.
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch.float32, torch.bfloat16 or torch.float16, given as such or by a name in DTYPES."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype in DTYPES.values():
        return dtype
    raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")


@dataclass(frozen=True)
class PredictorState:
    """Prediction-network state after the last emitted label, per stream (batch first).

    h, c:    (B, layers, H) LSTM state
    output:  (B, J) predictor output already projected by `joint.pred`
    """

    h: Tensor
    c: Tensor
    output: Tensor


class _DecRNN(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.lstm = nn.LSTM(
            cfg.pred_hidden,
            cfg.pred_hidden,
            num_layers=cfg.pred_rnn_layers,
            dropout=cfg.dropout if cfg.pred_rnn_layers > 1 else 0.0,
            batch_first=True,
        )


class _Prediction(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        # The blank id is the padding row: blank (and start-of-sequence) embeds to zeros.
        self.embed = nn.Embedding(cfg.vocab_size + 1, cfg.pred_hidden, padding_idx=cfg.blank_id)
        self.dec_rnn = _DecRNN(cfg)


class RNNTDecoder(nn.Module):
    """Prediction network: label embedding followed by a multi-layer LSTM."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.prediction = _Prediction(cfg)

    def forward(
        self, labels: Tensor, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """labels: (B, U); state: (h, c) each (layers, B, H). Returns (B, U, H) and the state."""
        x = self.prediction.embed(labels)  # (B, U, H)
        x = F.dropout(x, self.cfg.dropout, self.training)
        out, state = self.prediction.dec_rnn.lstm(x, state)
        return F.dropout(out, self.cfg.dropout, self.training), state


class RNNTJoint(nn.Module):
    def __init__(self, encoder_hidden: int, cfg: DecoderConfig) -> None:
        super().__init__()
        self.enc = nn.Linear(encoder_hidden, cfg.joint_hidden)
        self.pred = nn.Linear(cfg.pred_hidden, cfg.joint_hidden)
        # Index 2 in NeMo's Sequential(ReLU, Dropout, Linear) names the output layer's keys.
        self.joint_net = nn.Sequential(
            nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.joint_hidden, cfg.vocab_size + 1)
        )

    def forward(self, enc: Tensor, pred: Tensor) -> Tensor:
        """enc: (B, T, J) and pred: (B, U, J), both projected. Returns logits (B, T, U, V+1)."""
        return self.joint_net(enc[:, :, None, :] + pred[:, None, :, :])


class Transducer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d_model = cfg.encoder.d_model
        self.preprocessor = Preprocessor(cfg.mel)
        self.encoder = ConformerEncoder(cfg.encoder)
        self.decoder = RNNTDecoder(cfg.decoder)
        self.joint = RNNTJoint(d_model, cfg.decoder)
        if cfg.prompt is not None:
            self.prompt_kernel = nn.Sequential(
                nn.Linear(d_model + cfg.prompt.num_prompts, 2 * d_model),
                nn.ReLU(),
                nn.Linear(2 * d_model, d_model),
            )
            _start_as_identity(self.prompt_kernel, d_model)

    def apply_prompt(self, encoded: Tensor, prompt: Tensor | None) -> Tensor:
        """Condition encoder frames on each stream's language prompt.

        NeMo concatenates a one-hot (B, T, P) prompt to the frames and applies
        `prompt_kernel`; multiplying a one-hot by the first weight just selects
        one column, so that column is added as a bias instead. Always in float32:
        the language signal is under 1% of the projection's magnitude and bf16
        would erase it.

        Args:
            encoded: (B, T, D) encoder output; prompt: (B,) prompt indices.
        """
        if self.cfg.prompt is None:
            if prompt is not None:
                raise ValueError("this model has no language prompt")
            return encoded
        if prompt is None:
            raise ValueError("this model needs a language prompt index per stream")
        first, _, second = self.prompt_kernel
        d_model = encoded.shape[-1]
        weight = first.weight.float()  # (2D, D+P)
        bias = first.bias.float() + weight[:, d_model + prompt].T  # (B, 2D)
        hidden = F.relu(encoded.float() @ weight[:, :d_model].T + bias[:, None, :])  # (B, T, 2D)
        out = hidden @ second.weight.float().T + second.bias.float()  # (B, T, D)
        return out.to(encoded.dtype)

    def set_dtype(self, dtype: torch.dtype | str) -> Transducer:
        """Run the encoder and the prediction network in `dtype` (in place; returns self).

        Kept float32: the mel front end (its log of small powers needs it), the
        prompt projection (`apply_prompt`), and the joint, whose inputs are cast
        up: its output layer in bf16 flipped near-tied labels (10 of 40
        transcripts of the NeMo-built fixture models changed, none with a
        float32 joint), while on a GPU it costs little next to the encoder.
        """
        dtype = parse_dtype(dtype)
        self.encoder.to(dtype)
        self.decoder.to(dtype)
        return self

    @property
    def device(self) -> torch.device:
        """Where the weights are (read from the embedding, which is never quantized)."""
        return self.decoder.prediction.embed.weight.device

    def initial_predictor_state(self, batch: int) -> PredictorState:
        """The start-of-sequence state: the LSTM run once on blank from zeros."""
        device = self.device
        blank = torch.full((batch, 1), self.cfg.decoder.blank_id, dtype=torch.long, device=device)
        out, (h, c) = self.decoder(blank)
        return PredictorState(
            h=h.transpose(0, 1), c=c.transpose(0, 1), output=self.joint.pred(out[:, 0].float())
        )

    def predict(self, labels: Tensor, state: PredictorState) -> PredictorState:
        """Advance every stream's prediction network by one label. labels: (B,)."""
        hc = (state.h.transpose(0, 1).contiguous(), state.c.transpose(0, 1).contiguous())
        out, (h, c) = self.decoder(labels[:, None], hc)
        return PredictorState(
            h=h.transpose(0, 1), c=c.transpose(0, 1), output=self.joint.pred(out[:, 0].float())
        )


@torch.no_grad()
def _start_as_identity(prompt_kernel: nn.Sequential, d_model: int) -> None:
    """Start a fresh prompt kernel as the identity on the encoder frames, prompts at zero.

    relu(x) - relu(-x) = x: the first layer's 2D units are +x and -x, the second adds them
    back. With PyTorch's random init this ReLU layer, between the encoder and both heads,
    slowed training from scratch and lost units for good (214 of 320 never active after a
    40-locale run): one fixed batch of 8 utterances (CTC, 160 steps) went from loss 210 to
    30, against 1.6 with this start and 0.03 with no prompt kernel at all. Loaded checkpoints
    overwrite it.
    """
    first, _, second = prompt_kernel
    eye = torch.eye(d_model)
    first.weight.zero_()  # (2D, D+P): the prompt columns start at zero
    first.weight[:d_model, :d_model] = eye
    first.weight[d_model:, :d_model] = -eye
    first.bias.zero_()
    second.weight.copy_(torch.cat([eye, -eye], dim=1))  # (D, 2D)
    second.bias.zero_()
