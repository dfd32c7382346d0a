"""Batched greedy RNN-T decoding (label looping), resumable across streaming chunks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from caster.state import select_state
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
    return DecoderState(
        predictor=model.initial_predictor_state(batch),
        frames=torch.zeros(batch, dtype=torch.long, device=model.device),
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

    The joint's output layer (V+1 wide) runs only for the streams still
    decoding, and the prediction network only for those that emitted.

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
    enc = model.joint.enc(encoded.float())  # (B, T, J); the joint is float32 (`set_dtype`)
    predictor = state.predictor
    start_frames = state.frames.tolist()
    t = torch.zeros(batch, dtype=torch.long, device=device)
    emitted_here = torch.zeros(batch, dtype=torch.long, device=device)
    active = t < lengths
    hyps = [Hypothesis([], [], []) for _ in range(batch)]
    while (rows := torch.nonzero(active).squeeze(1)).numel() > 0:
        every = rows.numel() == batch
        frame = enc[rows, t[rows].clamp(max=t_max - 1)]  # (A, J)
        output = predictor.output if every else predictor.output[rows]  # (A, J)
        log_probs = torch.log_softmax(model.joint.joint_net(frame + output).float(), -1)
        row_score, row_label = log_probs.max(dim=-1)  # (A,)
        label = torch.full((batch,), cfg.blank_id, dtype=torch.long, device=device)
        label[rows] = row_label  # inactive streams read as blank: they emit nothing
        emit = label != cfg.blank_id  # (B,)
        emitters = torch.nonzero(emit).squeeze(1)
        if emitters.numel() > 0:
            emit_rows = emit[rows]
            for b, token, frame_t, score in zip(
                emitters.tolist(),
                row_label[emit_rows].tolist(),
                t[emitters].tolist(),
                row_score[emit_rows].tolist(),
                strict=True,
            ):
                hyps[b].token_ids.append(token)
                hyps[b].frames.append(start_frames[b] + frame_t)
                hyps[b].scores.append(score)
            predictor = _advance(model, predictor, label, emitters)
            emitted_here = emitted_here + emit.long()
        next_frame = active & (~emit | (emitted_here >= cfg.max_symbols))
        t = t + next_frame.long()
        emitted_here = torch.where(next_frame, 0, emitted_here)
        active = t < lengths
    return hyps, DecoderState(predictor=predictor, frames=state.frames + lengths)


def _advance(
    model: Transducer, predictor: PredictorState, label: Tensor, rows: Tensor
) -> PredictorState:
    """Feed label[rows] to the prediction network of those streams; the others keep theirs."""
    if rows.numel() == label.shape[0]:
        return model.predict(label, predictor)
    advanced = model.predict(label[rows], select_state(predictor, rows))
    return PredictorState(
        h=predictor.h.index_copy(0, rows, advanced.h),
        c=predictor.c.index_copy(0, rows, advanced.c),
        output=predictor.output.index_copy(0, rows, advanced.output),
    )
