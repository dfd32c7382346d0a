"""RNN-T loss in plain PyTorch: no compiled extension, CPU and GPU alike.

The loss of one utterance is -log P(y|x), summed over every alignment of the U labels with
the T encoder frames on the standard RNN-T lattice: node (t, u) means "frame t, u labels
emitted"; from it a blank moves to (t+1, u) and label y[u] to (t, u+1), each with the joint's
log-probability at (t, u). A path ends with the blank at (T-1, U).

Only two log-probabilities per node matter, so everything is built on
`rnnt_lattice_loss(blank_logp (B,T,U+1), label_logp (B,T,U))`, an autograd function that runs
the forward (alpha) and backward (beta) recursions without building a graph and returns the
exact gradient dL/dlogp = -exp(alpha + logp + beta_next - log P) (and, from the same two
recursions, each node's occupancy). Entry points that feed it:

- `rnnt_loss(logits (B,T,U+1,V+1), ...)`: from full joint logits (torchaudio's interface);
- `rnnt_loss_from_parts(joint_net, enc_proj, pred_proj, ...)`: never holds the full logits.
  It runs the joint on a few frames at a time, keeps only the two log-probs per node, and
  checkpoints each chunk so the backward pass recomputes the chunk's logits instead of
  storing them. Peak memory is one chunk's logits and their gradient, whatever T is.
- `simple_rnnt_loss` + `prune_windows` + `pruned_rnnt_loss_from_parts`: k2's pruned loss,
  the joint run only at a few label positions per frame, where a cheap trivial joint's paths go.

The recursions walk the lattice's anti-diagonals (t + u = n), vectorised over batch and u:
T+U+1 small steps each way. On CPU this took 26 ms forward+backward at B=4, T=200, U=50 (one
thread) against 60 ms for a loop over T with autograd through a log-cumsum-exp along U, and
unlike that trick it needs no cancellation-prone cumulative sums, so -inf (masked) edges are safe.

Reduction "mean" is the mean over the batch of per-utterance losses (NeMo's `mean_batch`, the
default of its RNN-T models, and torchaudio's "mean"); it is not divided by target lengths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

Reduction = Literal["mean", "sum", "none"]

# Joint logits (B, chunk, U+1, V+1) computed at once by `rnnt_loss_from_parts` when
# `chunk_frames` is not given: 2**26 elements = 256 MiB in float32.
DEFAULT_CHUNK_ELEMENTS = 1 << 26


class RNNTLossError(ValueError):
    """Inputs to the RNN-T loss have inconsistent shapes, lengths or labels."""


def rnnt_loss(
    logits: Tensor,
    targets: Tensor,
    logit_lengths: Tensor,
    target_lengths: Tensor,
    blank: int,
    reduction: Reduction = "mean",
) -> Tensor:
    """RNN-T negative log-likelihood from full joint logits.

    Args:
        logits: (B, T, U+1, V+1) unnormalised joint outputs (any float dtype; the loss is
            computed in float32, or float64 for float64 input).
        targets: (B, U) label ids; positions at or past `target_lengths` are ignored.
        logit_lengths: (B,) valid frames per utterance, 1 <= T_b <= T.
        target_lengths: (B,) labels per utterance, 0 <= U_b <= U.
        blank: id of the blank in the last dimension of `logits`.
        reduction: "mean" (over the batch), "sum" or "none" ((B,) per-utterance losses).

    Returns:
        The loss: a scalar, or (B,) for reduction "none".

    Raises:
        RNNTLossError: shapes, lengths, labels or the blank id are inconsistent.
    """
    if logits.dim() != 4:
        raise RNNTLossError(f"logits must be (B, T, U+1, V+1), got shape {tuple(logits.shape)}")
    batch, frames, nodes_u, classes = logits.shape
    targets = _check_inputs(
        targets, logit_lengths, target_lengths, blank, batch, frames, nodes_u - 1, classes
    )
    logits = logits.to(_compute_dtype(logits.dtype))
    blank_logp, label_logp = _node_logprobs(logits, targets, blank)
    return _reduce(
        rnnt_lattice_loss(blank_logp, label_logp, logit_lengths, target_lengths), reduction
    )


def rnnt_loss_from_parts(
    joint_net: Callable[[Tensor], Tensor],
    enc_proj: Tensor,
    pred_proj: Tensor,
    targets: Tensor,
    enc_lengths: Tensor,
    target_lengths: Tensor,
    blank: int,
    reduction: Reduction = "mean",
    chunk_frames: int | None = None,
) -> Tensor:
    """RNN-T loss that never materialises the full (B, T, U+1, V+1) joint logits.

    The joint runs on `chunk_frames` encoder frames at a time under activation
    checkpointing: the forward keeps only (B, T, U+1) blank and label log-probs, and the
    backward recomputes each chunk's logits (dropout masks included: checkpointing
    replays the RNG state). Equal to `rnnt_loss(joint_net(enc_proj[:, :, None] +
    pred_proj[:, None]), ...)`.

    Args:
        joint_net: maps (..., J) summed projections to (..., V+1) logits, e.g.
            `net.joint.joint_net` of a `caster.transducer.Transducer`.
        enc_proj: (B, T, J) encoder output after `net.joint.enc`.
        pred_proj: (B, U+1, J) prediction-network output (blank-prefixed labels) after
            `net.joint.pred`.
        targets: (B, U) label ids.
        enc_lengths: (B,) valid encoder frames, 1 <= T_b <= T.
        target_lengths: (B,) labels per utterance, 0 <= U_b <= U.
        blank: blank id (`vocab_size` in caster).
        reduction: "mean" (over the batch), "sum" or "none".
        chunk_frames: frames per joint chunk; by default as many as keep a chunk's logits
            within `DEFAULT_CHUNK_ELEMENTS`.

    Returns:
        The loss: a scalar, or (B,) for reduction "none".

    Raises:
        RNNTLossError: inconsistent shapes, lengths or labels, or chunk_frames < 1.
    """
    targets, chunk_frames = _check_parts(
        joint_net, enc_proj, pred_proj, targets, enc_lengths, target_lengths, blank,
        pred_proj.shape[1], chunk_frames,
    )  # fmt: skip

    def chunk_logprobs(enc_chunk: Tensor, pred: Tensor) -> tuple[Tensor, Tensor]:
        logits = joint_net(enc_chunk[:, :, None, :] + pred[:, None, :, :])  # (B, t, U+1, V+1)
        return _node_logprobs(logits.to(_compute_dtype(logits.dtype)), targets, blank)

    blank_logp, label_logp = _chunked(chunk_logprobs, enc_proj, pred_proj, chunk_frames)
    return _reduce(
        rnnt_lattice_loss(blank_logp, label_logp, enc_lengths, target_lengths), reduction
    )


def simple_rnnt_loss(
    am_logits: Tensor,
    lm_logits: Tensor,
    targets: Tensor,
    enc_lengths: Tensor,
    target_lengths: Tensor,
    blank: int,
    reduction: Reduction = "mean",
) -> tuple[Tensor, Tensor]:
    """RNN-T loss of the trivial joint am[t] + lm[u] (k2's "simple" loss), and where its
    paths go.

    The trivial joint's normaliser is a matrix product, logsumexp_v(am[t,v] + lm[u,v]) =
    log(exp(am[t]) . exp(lm[u])), so the whole lattice costs (B, T, U+1) numbers and one
    (T, V) x (V, U+1) product per utterance, not T x U joint evaluations.

    Args:
        am_logits: (B, T, V+1) per-frame logits (a linear layer on the encoder output).
        lm_logits: (B, U+1, V+1) per-label logits (a linear layer on the prediction network).
        targets, enc_lengths, target_lengths, blank, reduction: as for `rnnt_loss`.

    Returns:
        The loss, and the occupancy (B, T, U+1) of each node (no gradient): what
        `prune_windows` reads.
    """
    if am_logits.dim() != 3 or lm_logits.dim() != 3 or am_logits.shape[::2] != lm_logits.shape[::2]:
        raise RNNTLossError(
            f"am_logits must be (B, T, V+1) and lm_logits (B, U+1, V+1), got "
            f"{tuple(am_logits.shape)} and {tuple(lm_logits.shape)}"
        )
    batch, frames, classes = am_logits.shape
    targets = _check_inputs(
        targets, enc_lengths, target_lengths, blank, batch, frames, lm_logits.shape[1] - 1, classes
    )
    dtype = _compute_dtype(am_logits.dtype)
    am, lm = am_logits.to(dtype), lm_logits.to(dtype)
    am_max = am.detach().amax(-1, keepdim=True)  # (B, T, 1)
    lm_max = lm.detach().amax(-1, keepdim=True)  # (B, U+1, 1)
    products = torch.bmm((am - am_max).exp(), (lm - lm_max).exp().transpose(1, 2))  # (B, T, U+1)
    # A product can underflow to 0 where the two peaks sit on different classes.
    norm = products.clamp_min(torch.finfo(dtype).tiny).log() + am_max + lm_max.transpose(1, 2)
    blank_logp = am[:, :, blank, None] + lm[:, None, :, blank] - norm  # (B, T, U+1)
    am_labels = am.gather(2, targets[:, None, :].expand(-1, frames, -1))  # (B, T, U)
    lm_labels = lm[:, :-1].gather(2, targets[..., None])[..., 0]  # (B, U)
    label_logp = am_labels + lm_labels[:, None, :] - norm[:, :, :-1]
    losses, occupancy = rnnt_lattice_loss_and_occupancy(
        blank_logp, label_logp, enc_lengths, target_lengths
    )
    return _reduce(losses, reduction), occupancy


def prune_windows(
    occupancy: Tensor, enc_lengths: Tensor, target_lengths: Tensor, window: int
) -> tuple[Tensor, int]:
    """Per frame, the `window` consecutive label positions u that the full loss keeps.

    Each frame's window starts where it covers the most occupancy, then is moved so that
    a path exists through the windows alone: the first starts at u = 0, starts never
    decrease, grow by at most window - 1 a frame, and the last frame's window reaches U.
    The window is widened where an utterance has more labels than that allows.

    Args:
        occupancy: (B, T, U+1) node occupancy (`simple_rnnt_loss`).
        enc_lengths, target_lengths: (B,) as for `rnnt_loss`.
        window: label positions per frame, >= 2.

    Returns:
        starts (B, T) long, and the window used (at most U+1).
    """
    if window < 2:
        raise RNNTLossError(f"the pruning window must be >= 2, got {window}")
    _, frames, nodes_u = occupancy.shape
    device = occupancy.device
    frames_b = enc_lengths.to(device)[:, None].long()  # (B, 1)
    labels_b = target_lengths.to(device)[:, None].long()
    # Enough room to emit every label: U_b <= T_b x (window - 1).
    needed = int((-(-labels_b // frames_b)).max()) + 1
    window = min(max(window, needed), nodes_u)
    sums = occupancy.cumsum(-1)
    sums = torch.cat([sums[..., window - 1 : window], sums[..., window:] - sums[..., :-window]], -1)
    starts = sums.argmax(-1)  # (B, T): the window [s, s + window) with the most occupancy
    t = torch.arange(frames, device=device)[None, :]
    highest = (labels_b + 1 - window).clamp_min(0)
    # From frame t the path must still reach U_b: window - 1 labels a frame at most.
    lowest = torch.where(t < frames_b, labels_b - (frames_b - t) * (window - 1), 0)
    starts = torch.maximum(torch.minimum(starts, highest), lowest)
    starts[:, 0] = 0
    starts = starts.cummax(dim=1).values
    # s_t <- min(s_t, s_{t-1} + window - 1), unrolled: min over k <= t of s_k + (t-k)(w-1).
    step = t * (window - 1)
    starts = step + (starts - step).cummin(dim=1).values
    return starts, window


def pruned_rnnt_loss_from_parts(
    joint_net: Callable[[Tensor], Tensor],
    enc_proj: Tensor,
    pred_proj: Tensor,
    starts: Tensor,
    window: int,
    targets: Tensor,
    enc_lengths: Tensor,
    target_lengths: Tensor,
    blank: int,
    reduction: Reduction = "mean",
    chunk_frames: int | None = None,
) -> Tensor:
    """RNN-T loss over the pruned lattice: the joint runs only at the nodes (t, u) with
    starts[b, t] <= u < starts[b, t] + window; every other edge counts as impossible.

    Equal to `rnnt_loss_from_parts` when the windows cover every node, and never below it.
    k2's pruned RNN-T loss (Kuang et al., 2022), with windows from `prune_windows`.

    Args:
        joint_net, enc_proj, pred_proj, targets, enc_lengths, target_lengths, blank,
        reduction, chunk_frames: as for `rnnt_loss_from_parts`.
        starts: (B, T) first label position of each frame's window (`prune_windows`).
        window: label positions per frame, at most U+1.
    """
    if window < 1:
        raise RNNTLossError(f"the pruning window must be >= 1, got {window}")
    targets, chunk_frames = _check_parts(
        joint_net, enc_proj, pred_proj, targets, enc_lengths, target_lengths, blank, window,
        chunk_frames,
    )  # fmt: skip
    batch, frames, joint_dim = enc_proj.shape
    nodes_u = pred_proj.shape[1]
    if starts.shape != (batch, frames) or window > nodes_u:
        raise RNNTLossError(
            f"starts must be (B, T) = ({batch}, {frames}) and window <= {nodes_u}, got "
            f"{tuple(starts.shape)} and {window}"
        )
    nodes = starts[..., None] + torch.arange(window, device=starts.device)  # (B, T, W)
    if int(nodes.min()) < 0 or int(nodes.max()) >= nodes_u:
        raise RNNTLossError(f"pruning windows reach outside label positions 0..{nodes_u - 1}")
    next_label = torch.cat([targets, targets.new_zeros(batch, 1)], dim=1)  # (B, U+1)
    labels = next_label.gather(1, nodes.flatten(1)).view(batch, frames, window)

    def chunk_logprobs(enc_chunk: Tensor, pred: Tensor, chunk_nodes: Tensor, chunk_labels: Tensor):
        rows = chunk_nodes.flatten(1)[..., None].expand(-1, -1, joint_dim)  # (B, t*W, J)
        pred_nodes = pred.gather(1, rows).view(*chunk_nodes.shape, joint_dim)  # (B, t, W, J)
        logits = joint_net(enc_chunk[:, :, None, :] + pred_nodes)  # (B, t, W, V+1)
        logits = logits.to(_compute_dtype(logits.dtype))
        return _NodeLogProbs.apply(logits, chunk_labels, blank)

    blank_w, label_w = _chunked(chunk_logprobs, enc_proj, pred_proj, chunk_frames, nodes, labels)
    impossible = blank_w.new_full((batch, frames, nodes_u), float("-inf"))
    blank_logp = impossible.scatter(2, nodes, blank_w)  # (B, T, U+1)
    label_logp = impossible.scatter(2, nodes, label_w)[:, :, :-1]  # (B, T, U)
    return _reduce(
        rnnt_lattice_loss(blank_logp, label_logp, enc_lengths, target_lengths), reduction
    )


def _check_parts(
    joint_net: Callable[[Tensor], Tensor],
    enc_proj: Tensor,
    pred_proj: Tensor,
    targets: Tensor,
    enc_lengths: Tensor,
    target_lengths: Tensor,
    blank: int,
    nodes_per_frame: int,
    chunk_frames: int | None,
) -> tuple[Tensor, int]:
    """Validate the inputs of the `*_from_parts` losses; return the targets with padding
    replaced and the frames per joint chunk (by default as many as keep a chunk's
    B x nodes_per_frame x (V+1) logits within `DEFAULT_CHUNK_ELEMENTS`)."""
    if enc_proj.dim() != 3 or pred_proj.dim() != 3:
        raise RNNTLossError(
            f"enc_proj must be (B, T, J) and pred_proj (B, U+1, J), got "
            f"{tuple(enc_proj.shape)} and {tuple(pred_proj.shape)}"
        )
    batch, frames, joint_dim = enc_proj.shape
    if pred_proj.shape[0] != batch or pred_proj.shape[2] != joint_dim:
        raise RNNTLossError(
            f"pred_proj {tuple(pred_proj.shape)} does not match enc_proj {tuple(enc_proj.shape)}"
        )
    classes = _output_size(joint_net, enc_proj)
    if chunk_frames is None:
        chunk_frames = max(1, DEFAULT_CHUNK_ELEMENTS // (batch * nodes_per_frame * classes))
    elif chunk_frames < 1:
        raise RNNTLossError(f"chunk_frames must be >= 1, got {chunk_frames}")
    labels = pred_proj.shape[1] - 1
    targets = _check_inputs(
        targets, enc_lengths, target_lengths, blank, batch, frames, labels, classes
    )
    return targets, chunk_frames


def _chunked(
    chunk_logprobs: Callable[..., tuple[Tensor, Tensor]],
    enc_proj: Tensor,
    pred_proj: Tensor,
    chunk_frames: int,
    *per_frame: Tensor,
) -> tuple[Tensor, Tensor]:
    """`chunk_logprobs(enc_chunk, pred_proj, *per_frame chunks)` on `chunk_frames` frames at
    a time under activation checkpointing (the backward recomputes a chunk's logits instead
    of storing them); its two outputs concatenated along the frames."""
    pieces = [
        checkpoint(
            chunk_logprobs,
            enc_proj[:, start : start + chunk_frames],
            pred_proj,
            *(tensor[:, start : start + chunk_frames] for tensor in per_frame),
            use_reentrant=False,
        )
        for start in range(0, enc_proj.shape[1], chunk_frames)
    ]
    blank_logp = torch.cat([blank_part for blank_part, _ in pieces], dim=1)
    label_logp = torch.cat([label_part for _, label_part in pieces], dim=1)
    return blank_logp, label_logp


def rnnt_lattice_loss(
    blank_logp: Tensor, label_logp: Tensor, logit_lengths: Tensor, target_lengths: Tensor
) -> Tensor:
    """Per-utterance -log P(y|x) from the two log-probabilities of every lattice node.

    Args:
        blank_logp: (B, T, U+1) log P(blank | t, u).
        label_logp: (B, T, U) log P(y[u] | t, u), the next label of each node.
        logit_lengths: (B,) valid frames, 1 <= T_b <= T (not checked here).
        target_lengths: (B,) labels, 0 <= U_b <= U (not checked here).

    Returns:
        (B,) losses; differentiable with respect to both log-prob tensors.
    """
    return rnnt_lattice_loss_and_occupancy(blank_logp, label_logp, logit_lengths, target_lengths)[0]


def rnnt_lattice_loss_and_occupancy(
    blank_logp: Tensor, label_logp: Tensor, logit_lengths: Tensor, target_lengths: Tensor
) -> tuple[Tensor, Tensor]:
    """`rnnt_lattice_loss`, and the probability that a path visits each node (t, u):
    (B, T, U+1), without gradient. Both come from one forward and backward recursion.

    Every visited node with t < T_b is left by exactly one edge, so a node's occupancy is
    the sum of its two edges' shares.
    """
    return _LatticeLoss.apply(blank_logp, label_logp, logit_lengths, target_lengths)


class _LatticeLoss(torch.autograd.Function):
    """Both recursions run in the forward: the edges' shares of all paths are the
    gradient (training always asks for it) and the nodes' occupancy."""

    @staticmethod
    def forward(ctx, blank_logp, label_logp, logit_lengths, target_lengths):  # type: ignore[override]
        blank_m, label_m = _mask_edges(blank_logp, label_logp, logit_lengths, target_lengths)
        alpha = _alpha(blank_m, label_m)  # (B, T+1, U+1), row T = after the final blank
        beta = _beta(blank_m, label_m, logit_lengths, target_lengths)  # (B, T+1, U+1)
        device = blank_logp.device
        batch_idx = torch.arange(blank_logp.shape[0], device=device)
        log_p = alpha[batch_idx, logit_lengths.to(device).long(), target_lengths.to(device).long()]
        # The share of all paths through each blank (B, T, U+1) and label (B, T, U) edge;
        # masked edges have logp = -inf, hence a zero share.
        norm = log_p[:, None, None]
        blank_share = torch.exp(alpha[:, :-1] + blank_m + beta[:, 1:] - norm)
        label_share = torch.exp(alpha[:, :-1, :-1] + label_m + beta[:, :-1, 1:] - norm)
        occupancy = blank_share.clone()
        occupancy[:, :, :-1] += label_share
        ctx.save_for_backward(blank_share, label_share)
        ctx.mark_non_differentiable(occupancy)
        return -log_p, occupancy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_occupancy):  # type: ignore[override]
        blank_share, label_share = ctx.saved_tensors
        # d(-log P)/d(logp) of an edge is minus the share of all paths through it.
        scale = -grad_out[:, None, None]
        return scale * blank_share, scale * label_share, None, None


def _mask_edges(
    blank_logp: Tensor, label_logp: Tensor, logit_lengths: Tensor, target_lengths: Tensor
) -> tuple[Tensor, Tensor]:
    """Edge weights of the extended lattice, -inf where an utterance has no edge.

    Node rows run t = 0..T (row t = T_b is reached only by the final blank), so blank edges
    exist for t < T_b, u <= U_b and label edges for t < T_b, u < U_b.
    """
    frames, nodes_u = blank_logp.shape[1], blank_logp.shape[2]
    device = blank_logp.device
    t = torch.arange(frames, device=device)[None, :, None]
    u = torch.arange(nodes_u, device=device)[None, None, :]
    t_ok = t < logit_lengths.to(device)[:, None, None]
    u_max = target_lengths.to(device)[:, None, None]
    neg_inf = torch.tensor(float("-inf"), dtype=blank_logp.dtype, device=device)
    blank_m = torch.where(t_ok & (u <= u_max), blank_logp, neg_inf)  # (B, T, U+1)
    label_m = torch.where(t_ok & (u[..., :-1] < u_max), label_logp, neg_inf)  # (B, T, U)
    return blank_m, label_m


def _skew(x: Tensor, fill: float) -> Tensor:
    """(B, R, C) -> (B, R+C-1, C) with out[:, n, u] = x[:, n-u, u]; `fill` where n-u is off."""
    _, rows, cols = x.shape
    n = torch.arange(rows + cols - 1, device=x.device)[:, None]
    u = torch.arange(cols, device=x.device)[None, :]
    r = n - u  # (N, C)
    valid = (r >= 0) & (r < rows)
    out = x.gather(1, r.clamp(0, rows - 1).expand(x.shape[0], -1, -1))
    return out.masked_fill(~valid, fill)


def _unskew(s: Tensor, rows: int) -> Tensor:
    """Inverse of `_skew`: (B, R+C-1, C) -> (B, R, C)."""
    cols = s.shape[2]
    index = torch.arange(rows, device=s.device)[:, None] + torch.arange(cols, device=s.device)
    return s.gather(1, index.expand(s.shape[0], -1, -1))


def _edge_diagonals(blank_m: Tensor, label_m: Tensor) -> tuple[Tensor, Tensor]:
    """Skewed edge weights over the (T+1, U+1) node grid: (B, N, U+1) each, N = T+U+1.

    Entry [n, u] is the edge leaving node (n-u, u); the label edge is padded to U+1
    columns (no label edge leaves u = U) and both get a row T with no edges.
    """
    batch, frames, nodes_u = blank_m.shape
    inf = float("-inf")
    blank_full = blank_m.new_full((batch, frames + 1, nodes_u), inf)
    blank_full[:, :frames] = blank_m
    label_full = blank_m.new_full((batch, frames + 1, nodes_u), inf)
    label_full[:, :frames, :-1] = label_m
    return _skew(blank_full, inf), _skew(label_full, inf)


@torch.no_grad()
def _alpha(blank_m: Tensor, label_m: Tensor) -> Tensor:
    """Forward variables alpha[b, t, u] = log P(reach node (t, u)), (B, T+1, U+1)."""
    frames = blank_m.shape[1]
    blank_d, label_d = _edge_diagonals(blank_m, label_m)
    diags = blank_d.new_full(blank_d.shape, float("-inf"))  # (B, N, U+1): [n, u] = alpha[n-u, u]
    diags[:, 0, 0] = 0.0
    for n in range(1, diags.shape[1]):
        prev = diags[:, n - 1]  # (B, U+1)
        via_blank = prev + blank_d[:, n - 1]  # from (t-1, u)
        via_label = prev[:, :-1] + label_d[:, n - 1, :-1]  # from (t, u-1)
        diags[:, n, 0] = via_blank[:, 0]
        diags[:, n, 1:] = torch.logaddexp(via_blank[:, 1:], via_label)
    return _unskew(diags, frames + 1)


@torch.no_grad()
def _beta(
    blank_m: Tensor, label_m: Tensor, logit_lengths: Tensor, target_lengths: Tensor
) -> Tensor:
    """Backward variables beta[b, t, u] = log P(finish | node (t, u)), (B, T+1, U+1)."""
    batch, frames, nodes_u = blank_m.shape
    blank_d, label_d = _edge_diagonals(blank_m, label_m)
    # Each utterance ends at its own node (T_b, U_b), where beta = 0; no edge leaves it, so
    # max(end value, recursion) keeps the 0 there and the recursion everywhere else.
    ends = blank_m.new_full((batch, frames + 1, nodes_u), float("-inf"))
    device = blank_m.device
    ends[
        torch.arange(batch, device=device), logit_lengths.to(device), target_lengths.to(device)
    ] = 0
    diags = _skew(ends, float("-inf"))  # (B, N, U+1): [n, u] = beta[n-u, u]
    for n in range(diags.shape[1] - 2, -1, -1):
        nxt = diags[:, n + 1]  # (B, U+1)
        row = blank_d[:, n] + nxt  # to (t+1, u)
        via_label = label_d[:, n, :-1] + nxt[:, 1:]  # to (t, u+1)
        row[:, :-1] = torch.logaddexp(row[:, :-1], via_label)
        diags[:, n] = torch.maximum(diags[:, n], row)
    return _unskew(diags, frames + 1)


def _node_logprobs(logits: Tensor, targets: Tensor, blank: int) -> tuple[Tensor, Tensor]:
    """Blank and next-label log-probs of each node: (B, T, U+1) and (B, T, U).

    Args:
        logits: (B, T, U+1, V+1) joint outputs.
        targets: (B, U) label ids, all valid (padding replaced).
        blank: blank id.
    """
    # The last node of each frame has no next label: it reads id 0 and is cut off.
    next_label = torch.cat([targets, targets.new_zeros(targets.shape[0], 1)], dim=1)
    index = next_label[:, None, :].expand(-1, logits.shape[1], -1)  # (B, T, U+1)
    blank_logp, label_logp = _NodeLogProbs.apply(logits, index, blank)
    return blank_logp, label_logp[:, :, :-1]


class _NodeLogProbs(torch.autograd.Function):
    """Gathers two log-softmax entries per node without a full log_softmax.

    The backward writes d/dlogits = onehot * g - softmax * sum(g) into a single
    (B, T, U+1, V+1) tensor; plain autograd through logsumexp, select and gather would
    add up three tensors of that size, the largest allocations of the whole loss.
    """

    @staticmethod
    def forward(ctx, logits, label_index, blank):  # type: ignore[override]
        # logits (B, T, N, V+1), label_index (B, T, N): the label read at each node.
        norm = torch.logsumexp(logits, dim=-1)  # (B, T, N)
        blank_logp = logits[..., blank] - norm
        index = label_index[..., None]  # (B, T, N, 1)
        label_logp = logits.gather(-1, index)[..., 0] - norm
        ctx.save_for_backward(logits, norm, index)
        ctx.blank = blank
        return blank_logp, label_logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_blank, grad_label):  # type: ignore[override]
        logits, norm, index = ctx.saved_tensors
        total = grad_blank + grad_label  # (B, T, N): the gradients of each node's outputs
        grad = (logits - norm[..., None]).exp_()  # softmax
        grad.mul_(total[..., None].neg_())
        grad[..., ctx.blank] += grad_blank
        grad.scatter_add_(-1, index, grad_label[..., None])
        return grad, None, None


def _check_inputs(
    targets: Tensor,
    logit_lengths: Tensor,
    target_lengths: Tensor,
    blank: int,
    batch: int,
    frames: int,
    labels: int,
    classes: int,
) -> Tensor:
    """Validate shapes and lengths; return targets with padding replaced by a valid id (0)."""
    if batch == 0:
        raise RNNTLossError("the batch is empty")
    if targets.shape != (batch, labels):
        raise RNNTLossError(
            f"targets must be (B, U) = ({batch}, {labels}), got {tuple(targets.shape)}"
        )
    for name, lengths in (("logit_lengths", logit_lengths), ("target_lengths", target_lengths)):
        if lengths.shape != (batch,) or lengths.is_floating_point():
            raise RNNTLossError(f"{name} must be an integer (B,) = ({batch},) tensor")
    if int(logit_lengths.min()) < 1 or int(logit_lengths.max()) > frames:
        raise RNNTLossError(
            f"logit_lengths must lie in [1, {frames}], got {logit_lengths.tolist()}"
        )
    if int(target_lengths.min()) < 0 or int(target_lengths.max()) > labels:
        raise RNNTLossError(
            f"target_lengths must lie in [0, {labels}], got {target_lengths.tolist()}"
        )
    if not 0 <= blank < classes:
        raise RNNTLossError(f"blank id {blank} is outside the {classes} joint outputs")
    valid = (
        torch.arange(labels, device=targets.device)[None, :]
        < target_lengths.to(targets.device)[:, None]
    )
    targets = torch.where(valid, targets.long(), 0)
    if valid.any():
        used = targets[valid]
        if int(used.min()) < 0 or int(used.max()) >= classes:
            raise RNNTLossError(
                f"target ids must lie in [0, {classes}), got ids from {int(used.min())} "
                f"to {int(used.max())}"
            )
        if bool((used == blank).any()):
            raise RNNTLossError(f"targets contain the blank id {blank}")
    return targets


def _output_size(joint_net: Callable[[Tensor], Tensor], enc_proj: Tensor) -> int:
    """Number of joint outputs, V+1, from one frame's worth of input."""
    with torch.no_grad():
        return int(joint_net(enc_proj[:1, :1]).shape[-1])


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision log-sum-exp over thousands of classes loses the loss' small terms.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce(losses: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    if reduction == "none":
        return losses
    raise RNNTLossError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
