"""Batched greedy RNN-T decoding (label looping), resumable across streaming chunks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from caster.transducer import PredictorState, Transducer


@dataclass(frozen=True)
class DecoderState:
    """Greedy decoder state carried between chunks, per stream (batch first).

    predictor: the prediction network after the last emitted label
    frames:    (B,) encoder frames decoded so far (token times are counted from here)
    """

    predictor: PredictorState
    frames: Tensor


@dataclass(frozen=True)
class Hypothesis:
    """New labels of one stream from one decoding call."""

    token_ids: list[int]
    frames: list[int]  # absolute encoder frame of each label
    scores: list[float]  # log-probability of each label (for confidences)


def initial_decoder_state(model: Transducer, batch: int) -> DecoderState:
    device = model.joint.pred.weight.device
    return DecoderState(
        predictor=model.initial_predictor_state(batch),
        frames=torch.zeros(batch, dtype=torch.long, device=device),
    )


@torch.inference_mode()
def greedy_decode(
    model: Transducer, encoded: Tensor, lengths: Tensor, state: DecoderState
) -> tuple[list[Hypothesis], DecoderState]:
    """Greedy label-looping decoding of a batch of (prompted) encoder frames.

    At each stream's current frame t the joint picks the best label; blank moves
    to t+1, any other label is emitted and fed to the prediction network, and at
    most `max_symbols` labels are emitted on one frame before t is forced on.
    Decoding chunk by chunk with the returned state equals decoding the whole
    sequence at once, since the loop never looks past the current frame.

    Args:
        encoded: (B, T, D) encoder output after the language prompt.
        lengths: (B,) valid frames per stream.
        state: from `initial_decoder_state` or the previous call.
    Returns:
        the new labels of each stream and the state after the last valid frame.
    """
    cfg = model.cfg.decoder
    batch, t_max = encoded.shape[:2]
    device = encoded.device
    rows = torch.arange(batch, device=device)
    enc = model.joint.enc(encoded)  # (B, T, J)
    predictor = state.predictor
    t = torch.zeros(batch, dtype=torch.long, device=device)
    emitted_here = torch.zeros(batch, dtype=torch.long, device=device)
    active = t < lengths
    hyps = [Hypothesis([], [], []) for _ in range(batch)]
    while bool(active.any()):
        frame = enc[rows, t.clamp(max=t_max - 1)]  # (B, J)
        log_probs = torch.log_softmax(model.joint.joint_net(frame + predictor.output).float(), -1)
        score, label = log_probs.max(dim=-1)  # (B,)
        emit = active & (label != cfg.blank_id)
        if bool(emit.any()):
            for b in torch.nonzero(emit).squeeze(1).tolist():
                hyps[b].token_ids.append(int(label[b]))
                hyps[b].frames.append(int(state.frames[b] + t[b]))
                hyps[b].scores.append(float(score[b]))
            advanced = model.predict(torch.where(emit, label, cfg.blank_id), predictor)
            keep = emit[:, None]
            predictor = PredictorState(
                h=torch.where(keep[..., None], advanced.h, predictor.h),
                c=torch.where(keep[..., None], advanced.c, predictor.c),
                output=torch.where(keep, advanced.output, predictor.output),
            )
            emitted_here = emitted_here + emit.long()
        next_frame = active & (~emit | (emitted_here >= cfg.max_symbols))
        t = t + next_frame.long()
        emitted_here = torch.where(next_frame, 0, emitted_here)
        active = t < lengths
    return hyps, DecoderState(predictor=predictor, frames=state.frames + lengths)
