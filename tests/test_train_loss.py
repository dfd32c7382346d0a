"""RNN-T loss: brute force over all alignments, finite differences, lean == full."""

from __future__ import annotations

import itertools

import pytest
import torch

from caster.config import DecoderConfig
from caster.train.loss import (
    RNNTLossError,
    prune_windows,
    pruned_rnnt_loss_from_parts,
    rnnt_lattice_loss,
    rnnt_lattice_loss_and_occupancy,
    rnnt_loss,
    rnnt_loss_from_parts,
    simple_rnnt_loss,
)
from caster.transducer import RNNTJoint


def brute_force_nll(logits: torch.Tensor, targets: list[int], frames: int, blank: int) -> float:
    """-log of the summed probability of every alignment, enumerated one by one.

    An alignment is an order of U label moves and T-1 blank moves from node (0, 0) to
    (T-1, U), followed by the final blank there.
    """
    labels = len(targets)
    logp = logits.detach()[:frames, : labels + 1].double().log_softmax(-1)
    paths = []
    for label_moves in itertools.combinations(range(frames - 1 + labels), labels):
        t = u = 0
        total = torch.zeros((), dtype=torch.float64)
        for move in range(frames - 1 + labels):
            if move in label_moves:
                total = total + logp[t, u, targets[u]]
                u += 1
            else:
                total = total + logp[t, u, blank]
                t += 1
        paths.append(total + logp[frames - 1, labels, blank])
    return -float(torch.logsumexp(torch.stack(paths), 0))


def dynamic_programming_nll(
    logits: torch.Tensor, targets: list[int], frames: int, blank: int
) -> torch.Tensor:
    """The textbook alpha recursion, one node at a time (differentiable, for bigger lattices)."""
    logp = logits[:frames, : len(targets) + 1].log_softmax(-1)
    alpha: dict[tuple[int, int], torch.Tensor] = {}
    for t in range(frames):
        for u in range(len(targets) + 1):
            terms = []
            if t == 0 and u == 0:
                terms.append(logp.new_zeros(()))
            if t > 0:
                terms.append(alpha[t - 1, u] + logp[t - 1, u, blank])
            if u > 0:
                terms.append(alpha[t, u - 1] + logp[t, u - 1, targets[u - 1]])
            alpha[t, u] = torch.logsumexp(torch.stack(terms), 0)
    return -(alpha[frames - 1, len(targets)] + logp[frames - 1, len(targets), blank])


def random_case(seed: int, blank_last: bool, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    batch, frames, labels, vocab = 4, 4, 4, 5
    logits = torch.randn(batch, frames, labels + 1, vocab + 1, generator=g, dtype=dtype) * 2
    blank = vocab if blank_last else 0
    low = 0 if blank_last else 1
    targets = torch.randint(low, low + vocab, (batch, labels), generator=g)
    # Unequal lengths, including a single frame and an empty transcript; padding garbage.
    logit_lengths = torch.tensor([4, 1, 3, 2])
    target_lengths = torch.tensor([4, 2, 0, 3])
    for b in range(batch):
        targets[b, target_lengths[b] :] = -7
    return logits, targets, logit_lengths, target_lengths, blank


@pytest.mark.parametrize("seed", range(4))
def test_loss_equals_brute_force(seed):
    logits, targets, logit_lengths, target_lengths, blank = random_case(seed, seed % 2 == 0)
    got = rnnt_loss(logits, targets, logit_lengths, target_lengths, blank, reduction="none")
    for b in range(logits.shape[0]):
        args = (logits[b], targets[b, : target_lengths[b]].tolist(), int(logit_lengths[b]), blank)
        ref = brute_force_nll(*args)
        assert got[b].item() == pytest.approx(ref, rel=1e-12, abs=1e-12)
        # The recursion the other tests trust for bigger lattices agrees with brute force too.
        assert dynamic_programming_nll(*args).item() == pytest.approx(ref, rel=1e-12, abs=1e-12)


def test_loss_and_gradient_equal_the_textbook_recursion_on_bigger_lattices():
    g = torch.Generator().manual_seed(11)
    vocab, blank = 9, 3
    logits = (
        torch.randn(3, 14, 7, vocab + 1, generator=g, dtype=torch.float64) * 3
    ).requires_grad_()
    targets = torch.tensor([[1, 2, 4, 5, 9, 0], [8, 8, 8, 0, 0, 0], [2, 0, 0, 0, 0, 0]])
    logit_lengths, target_lengths = torch.tensor([14, 9, 3]), torch.tensor([6, 3, 1])
    got = rnnt_loss(logits, targets, logit_lengths, target_lengths, blank, reduction="sum")
    (got_grad,) = torch.autograd.grad(got, logits)
    ref = sum(
        dynamic_programming_nll(
            logits[b], targets[b, : target_lengths[b]].tolist(), int(logit_lengths[b]), blank
        )
        for b in range(3)
    )
    (ref_grad,) = torch.autograd.grad(ref, logits)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_reductions():
    logits, targets, logit_lengths, target_lengths, blank = random_case(5, True)
    per_utt = rnnt_loss(logits, targets, logit_lengths, target_lengths, blank, reduction="none")
    mean = rnnt_loss(logits, targets, logit_lengths, target_lengths, blank)
    total = rnnt_loss(logits, targets, logit_lengths, target_lengths, blank, reduction="sum")
    assert mean.item() == pytest.approx(per_utt.mean().item())
    assert total.item() == pytest.approx(per_utt.sum().item())
    with pytest.raises(RNNTLossError, match="reduction"):
        rnnt_loss(logits, targets, logit_lengths, target_lengths, blank, reduction="avg")


def test_gradient_passes_finite_difference_check():
    logits, targets, *_ = random_case(7, True)
    logits = logits[:, :3, :3, :4].clone().requires_grad_(True)  # (4, 3, 3, 4): blank = 3
    targets = targets[:, :2].clamp(0, 2)
    logit_lengths = torch.tensor([3, 1, 2, 3])
    target_lengths = torch.tensor([2, 1, 0, 2])
    # Per-utterance weights make a wrong gradient of any one utterance visible.
    weights = torch.tensor([1.0, -0.5, 2.0, 0.25], dtype=torch.float64)

    def loss(x):
        return rnnt_loss(x, targets, logit_lengths, target_lengths, 3, reduction="none") * weights

    assert torch.autograd.gradcheck(loss, (logits,), eps=1e-6, atol=1e-8)
    # Frames and label positions past an utterance's lengths get no gradient.
    loss(logits).sum().backward()
    assert logits.grad[1, 1:].abs().max() == 0
    assert logits.grad[2, :, 1:].abs().max() == 0


def tiny_joint(seed: int, vocab: int = 6, hidden: int = 8) -> RNNTJoint:
    torch.manual_seed(seed)
    joint = RNNTJoint(hidden, DecoderConfig(vocab_size=vocab, pred_hidden=hidden, joint_hidden=7))
    return joint.double().eval()


@pytest.mark.parametrize("chunk_frames", [1, 3, None])
def test_lean_loss_equals_full_loss_and_gradients(chunk_frames):
    vocab = 6
    joint = tiny_joint(0, vocab)
    g = torch.Generator().manual_seed(1)
    enc = torch.randn(3, 7, 7, generator=g, dtype=torch.float64, requires_grad=True)
    pred = torch.randn(3, 4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (3, 3), generator=g)
    enc_lengths = torch.tensor([7, 5, 2])
    target_lengths = torch.tensor([3, 1, 2])

    full_logits = joint.joint_net(enc[:, :, None] + pred[:, None])
    full = rnnt_loss(full_logits, targets, enc_lengths, target_lengths, vocab)
    full_grads = torch.autograd.grad(full, (enc, pred, *joint.joint_net.parameters()))
    lean = rnnt_loss_from_parts(
        joint.joint_net, enc, pred, targets, enc_lengths, target_lengths, vocab,
        chunk_frames=chunk_frames,
    )  # fmt: skip
    lean_grads = torch.autograd.grad(lean, (enc, pred, *joint.joint_net.parameters()))
    assert lean.item() == pytest.approx(full.item(), rel=1e-12)
    for a, b in zip(full_grads, lean_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_lean_loss_equals_brute_force():
    vocab = 4
    joint = tiny_joint(2, vocab)
    g = torch.Generator().manual_seed(3)
    enc = torch.randn(2, 4, 7, generator=g, dtype=torch.float64)
    pred = torch.randn(2, 4, 7, generator=g, dtype=torch.float64)
    targets = torch.tensor([[1, 0, 3], [2, 2, 0]])
    lengths, target_lengths = torch.tensor([4, 3]), torch.tensor([3, 2])
    got = rnnt_loss_from_parts(
        joint.joint_net, enc, pred, targets, lengths, target_lengths, vocab,
        reduction="none", chunk_frames=2,
    )  # fmt: skip
    logits = joint.joint_net(enc[:, :, None] + pred[:, None])
    for b in range(2):
        ref = brute_force_nll(
            logits[b], targets[b, : target_lengths[b]].tolist(), int(lengths[b]), vocab
        )
        assert got[b].item() == pytest.approx(ref, rel=1e-12)


def test_float32_long_utterance_matches_float64():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 120, 31, 17, generator=g)
    targets = torch.randint(0, 16, (2, 30), generator=g)
    lengths, target_lengths = torch.tensor([120, 77]), torch.tensor([30, 12])
    got = rnnt_loss(logits, targets, lengths, target_lengths, 16, reduction="none")
    ref = rnnt_loss(logits.double(), targets, lengths, target_lengths, 16, reduction="none")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)


def test_half_precision_logits_are_scored_in_float32():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 5, 3, 9, generator=g).bfloat16()
    targets = torch.randint(0, 8, (2, 2), generator=g)
    args = (targets, torch.tensor([5, 4]), torch.tensor([2, 1]), 8)
    got = rnnt_loss(logits.requires_grad_(), *args)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(rnnt_loss(logits.float(), *args).item(), rel=1e-6)
    got.backward()
    assert logits.grad.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"targets": torch.tensor([[1, 4], [0, 0]])}, "blank id"),
        ({"targets": torch.tensor([[1, 9], [0, 0]])}, "target ids"),
        ({"logit_lengths": torch.tensor([0, 2])}, "logit_lengths"),
        ({"logit_lengths": torch.tensor([4, 2])}, "logit_lengths"),
        ({"target_lengths": torch.tensor([3, 0])}, "target_lengths"),
        ({"target_lengths": torch.tensor([1.0, 0.0])}, "integer"),
        ({"targets": torch.zeros(2, 3, dtype=torch.long)}, "targets must be"),
        ({"blank": 5}, "blank id 5"),
    ],
)
def test_inconsistent_inputs_raise(change, match):
    args = {
        "logits": torch.randn(2, 3, 3, 5),
        "targets": torch.tensor([[1, 2], [0, 0]]),
        "logit_lengths": torch.tensor([3, 2]),
        "target_lengths": torch.tensor([2, 0]),
        "blank": 4,
    } | change
    with pytest.raises(RNNTLossError, match=match):
        rnnt_loss(**args)


def test_lean_loss_rejects_bad_chunking_and_shapes():
    joint = tiny_joint(0)
    enc, pred = torch.zeros(1, 3, 7, dtype=torch.float64), torch.zeros(1, 2, 7, dtype=torch.float64)
    args = (torch.tensor([[1]]), torch.tensor([3]), torch.tensor([1]), 6)
    with pytest.raises(RNNTLossError, match="chunk_frames"):
        rnnt_loss_from_parts(joint.joint_net, enc, pred, *args, chunk_frames=0)
    with pytest.raises(RNNTLossError, match="pred_proj"):
        rnnt_loss_from_parts(joint.joint_net, enc, pred[..., :5], *args)


def test_matches_torchaudio_when_installed():
    """torchaudio's compiled loss as a second reference (not installable next to every torch)."""
    functional = pytest.importorskip("torchaudio.functional")
    if not hasattr(functional, "rnnt_loss"):
        pytest.skip("this torchaudio has no rnnt_loss")
    logits, targets, logit_lengths, target_lengths, blank = random_case(9, True, torch.float32)
    targets = targets.clamp(min=0)
    ref = functional.rnnt_loss(
        logits, targets.int(), logit_lengths.int(), target_lengths.int(), blank=blank,
        reduction="none",
    )  # fmt: skip
    got = rnnt_loss(logits, targets, logit_lengths, target_lengths, blank, reduction="none")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ pruned RNN-T


def pruned_case(seed: int, labels: int = 6):
    vocab, batch, frames = 7, 3, 9
    joint = tiny_joint(seed, vocab)
    g = torch.Generator().manual_seed(seed)
    enc = torch.randn(batch, frames, 7, generator=g, dtype=torch.float64, requires_grad=True)
    pred = torch.randn(batch, labels + 1, 7, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (batch, labels), generator=g)
    # One utterance with more labels than frames: a window of 2 could not emit them all.
    enc_lengths = torch.tensor([frames, 5, 2])
    target_lengths = torch.tensor([labels, 2, min(labels, 5)])
    return joint, enc, pred, targets, enc_lengths, target_lengths, vocab


def test_occupancy_counts_every_visited_node_once():
    logits, targets, logit_lengths, target_lengths, blank = random_case(0, blank_last=True)
    blank_logp = logits.log_softmax(-1)[..., blank]
    label_logp = (
        logits[:, :, :-1]
        .log_softmax(-1)
        .gather(-1, targets.clamp_min(0)[:, None, :, None].expand(-1, logits.shape[1], -1, 1))[
            ..., 0
        ]
    )
    occupancy = rnnt_lattice_loss_and_occupancy(
        blank_logp, label_logp, logit_lengths, target_lengths
    )[1]
    # A path visits T_b + U_b nodes before its final blank.
    torch.testing.assert_close(
        occupancy.sum((1, 2)), (logit_lengths + target_lengths).double(), rtol=1e-12, atol=0
    )
    # ... and the occupancy is the share of paths leaving the node: minus the loss gradient.
    blank_leaf, label_leaf = blank_logp.requires_grad_(), label_logp.requires_grad_()
    losses = rnnt_lattice_loss(blank_leaf, label_leaf, logit_lengths, target_lengths)
    grad_blank, grad_label = torch.autograd.grad(losses.sum(), (blank_leaf, label_leaf))
    grad_blank[:, :, :-1] += grad_label
    torch.testing.assert_close(occupancy, -grad_blank, rtol=1e-12, atol=1e-15)


def test_simple_loss_equals_the_full_loss_of_the_summed_logits():
    g = torch.Generator().manual_seed(5)
    vocab = 6
    am = torch.randn(3, 5, vocab + 1, generator=g, dtype=torch.float64, requires_grad=True)
    lm = torch.randn(3, 4, vocab + 1, generator=g, dtype=torch.float64, requires_grad=True)
    # Large logits: the normaliser's matrix product must not under- or overflow.
    am_scaled, lm_scaled = am * 30, lm * 30
    targets = torch.randint(0, vocab, (3, 3), generator=g)
    lengths, target_lengths = torch.tensor([5, 3, 1]), torch.tensor([3, 0, 2])
    full = rnnt_loss(
        am_scaled[:, :, None] + lm_scaled[:, None], targets, lengths, target_lengths, vocab
    )
    simple, occupancy = simple_rnnt_loss(
        am_scaled, lm_scaled, targets, lengths, target_lengths, vocab
    )
    assert simple.item() == pytest.approx(full.item(), rel=1e-10)
    for a, b in zip(
        torch.autograd.grad(full, (am, lm), retain_graph=True),
        torch.autograd.grad(simple, (am, lm)),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert occupancy.shape == (3, 5, 4) and not occupancy.requires_grad


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("window", [2, 3, 4])
def test_prune_windows_leave_a_path_through_them(seed, window):
    g = torch.Generator().manual_seed(seed)
    occupancy = torch.rand(4, 9, 7, generator=g, dtype=torch.float64) ** 8
    enc_lengths, target_lengths = torch.tensor([9, 2, 4, 1]), torch.tensor([6, 6, 3, 0])
    starts, used = prune_windows(occupancy, enc_lengths, target_lengths, window)
    assert window <= used <= 7 and used >= 4  # 6 labels in 2 frames need 4 positions a frame
    assert starts.dtype == torch.long and starts.shape == (4, 9)
    assert int(starts.min()) >= 0 and int((starts + used).max()) <= 7
    assert (starts[:, 0] == 0).all()
    steps = starts[:, 1:] - starts[:, :-1]
    assert (steps >= 0).all() and (steps <= used - 1).all()
    last = starts[torch.arange(4), enc_lengths - 1]
    assert (last + used - 1 >= target_lengths).all()


def test_pruned_loss_with_full_windows_equals_the_full_loss():
    joint, enc, pred, targets, enc_lengths, target_lengths, vocab = pruned_case(0)
    params = (enc, pred, *joint.joint_net.parameters())
    full = rnnt_loss_from_parts(
        joint.joint_net, enc, pred, targets, enc_lengths, target_lengths, vocab
    )
    starts = torch.zeros(enc.shape[:2], dtype=torch.long)
    pruned = pruned_rnnt_loss_from_parts(
        joint.joint_net, enc, pred, starts, pred.shape[1], targets, enc_lengths, target_lengths,
        vocab, chunk_frames=4,
    )  # fmt: skip
    assert pruned.item() == pytest.approx(full.item(), rel=1e-12)
    for a, b in zip(
        torch.autograd.grad(full, params), torch.autograd.grad(pruned, params), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("window", [2, 3, 5])
def test_pruned_loss_is_finite_and_bounds_the_full_loss(window):
    joint, enc, pred, targets, enc_lengths, target_lengths, vocab = pruned_case(1)
    full = rnnt_loss_from_parts(
        joint.joint_net, enc, pred, targets, enc_lengths, target_lengths, vocab, reduction="none"
    )
    # Occupancy of the full model itself: the windows keep its likeliest paths.
    logits = joint.joint_net(enc[:, :, None] + pred[:, None]).log_softmax(-1)
    blank_logp = logits[..., vocab]
    label_logp = logits[:, :, :-1].gather(-1, targets[:, None, :, None].expand(-1, 9, -1, 1))
    occupancy = rnnt_lattice_loss_and_occupancy(
        blank_logp, label_logp[..., 0], enc_lengths, target_lengths
    )[1]
    starts, used = prune_windows(occupancy, enc_lengths, target_lengths, window)
    pruned = pruned_rnnt_loss_from_parts(
        joint.joint_net, enc, pred, starts, used, targets, enc_lengths, target_lengths, vocab,
        reduction="none",
    )  # fmt: skip
    assert torch.isfinite(pruned).all()
    assert (pruned >= full - 1e-9).all()  # fewer paths
    grads = torch.autograd.grad(pruned.sum(), (enc, pred))
    assert all(torch.isfinite(grad).all() for grad in grads)


def test_pruned_loss_rejects_windows_outside_the_lattice():
    joint, enc, pred, targets, enc_lengths, target_lengths, vocab = pruned_case(0)
    starts = torch.full(enc.shape[:2], 5, dtype=torch.long)
    with pytest.raises(RNNTLossError, match="outside"):
        pruned_rnnt_loss_from_parts(
            joint.joint_net, enc, pred, starts, 3, targets, enc_lengths, target_lengths, vocab
        )
    with pytest.raises(RNNTLossError, match="window"):
        prune_windows(torch.ones(3, 9, 7), enc_lengths, target_lengths, 1)
