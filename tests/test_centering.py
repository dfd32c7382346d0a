"""The fresh subsampling front (space-to-depth) and the centred step of its output Linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from caster.config import EncoderConfig
from caster.encoder import (
    SPACE_TO_DEPTH_SCALE,
    SPACE_TO_DEPTH_SHIFT,
    ConvSubsampling,
    subsampled_length,
)
from caster.train.centering import MOMENTUM, CentredInputs
from caster.train.distributed import DistInfo

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def front(channels: int, feat_in: int = 32, d_model: int = 16) -> ConvSubsampling:
    torch.manual_seed(0)
    cfg = EncoderConfig(
        feat_in=feat_in, n_layers=1, d_model=d_model, n_heads=2, subsampling_conv_channels=channels
    )
    return ConvSubsampling(cfg)


def conv_features(
    module: ConvSubsampling, mel: torch.Tensor, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """The Linear's input: (B, T', C, F')."""
    seen = []
    handle = module.out.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    module(mel, torch.tensor([mel.shape[1]] * mel.shape[0]) if lengths is None else lengths)
    handle.remove()
    b, t, _ = seen[0].shape
    return seen[0].detach().reshape(b, t, module.conv[0].out_channels, -1)


def test_a_fresh_front_is_space_to_depth_of_the_mel_patches():
    module = front(channels=72)  # 64 space-to-depth channels, 8 keep PyTorch's init
    mel = torch.rand(2, 40, 32) * 20 - 16  # (B, T, F) log-mel values above the floor
    features = conv_features(module, mel)  # (B, 6, 72, 5)
    # Output cell (k, j) holds the 8x8 patch of mel ending at (8k, 8j); cells whose patch
    # reaches into the causal padding (k or j = 0) or past the end are not space-to-depth.
    for k in range(1, (mel.shape[1] - 1) // 8 + 1):
        for j in range(1, (mel.shape[2] - 1) // 8 + 1):
            patch = mel[:, 8 * k - 7 : 8 * k + 1, 8 * j - 7 : 8 * j + 1].reshape(2, 64)
            expected = patch * SPACE_TO_DEPTH_SCALE + SPACE_TO_DEPTH_SHIFT
            torch.testing.assert_close(features[:, k, :64, j], expected)
    assert features[:, :, 64:].abs().sum() > 0  # the extra channels still compute


def test_fronts_too_narrow_for_space_to_depth_keep_the_default_init():
    module = front(channels=32)
    torch.manual_seed(0)
    reference = torch.nn.Conv2d(1, 32, 3, stride=2)
    assert torch.equal(module.conv[0].weight, reference.weight)


def centred_reference(
    module: ConvSubsampling, mel: torch.Tensor, lengths: torch.Tensor, mean: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Adam step of y = W (x - mean) + c taken literally; returns (W, b = c - W mean)."""
    weight = module.out.weight.detach().clone().requires_grad_()
    centre = (module.out.bias.detach() + module.out.weight.detach() @ mean).requires_grad_()
    optimizer = torch.optim.Adam([weight, centre], lr=0.1)
    captured = []
    handle = module.out.register_forward_hook(lambda m, args, out: captured.append(args[0]))
    module(mel, lengths)
    handle.remove()
    loss_of(F.linear(captured[0].detach() - mean, weight, centre), lengths).backward()
    optimizer.step()
    return weight.detach(), (centre - weight @ mean).detach()


def loss_of(y: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    valid = torch.arange(y.shape[1])[None, :] < subsampled_length(lengths, 3)[:, None]
    return (torch.sin(y) * valid[..., None]).sum()


def test_the_centred_step_equals_a_step_of_the_centred_parametrisation():
    module = front(channels=64)
    mel = torch.rand(3, 48, 32) * 20 - 16
    lengths = torch.tensor([48, 30, 9])
    # The mean counts only frames within each utterance's length.
    features = conv_features(module, mel, lengths)
    frames = features.shape[1]
    valid = torch.arange(frames)[None, :] < subsampled_length(lengths, 3)[:, None]
    inputs = features.reshape(3, frames, -1)[valid]  # (valid frames, C*F')
    first_mean = inputs.mean(0)
    expected = centred_reference(module, mel, lengths, first_mean)

    centring = CentredInputs(module, SINGLE)
    optimizer = torch.optim.Adam(module.out.parameters(), lr=0.1)
    module.train()

    loss_of(module(mel, lengths)[0], lengths).backward()
    centring.centre_gradients()
    optimizer.step()
    centring.correct_bias()
    torch.testing.assert_close(centring.mean, first_mean)
    torch.testing.assert_close(module.out.weight, expected[0])
    torch.testing.assert_close(module.out.bias, expected[1])
    # The next step's batch moves the running mean by MOMENTUM.
    optimizer.zero_grad()
    other = torch.rand(2, 48, 32) * 20 - 16
    batch_mean = conv_features(module, other).flatten(2).mean((0, 1))
    centring.centre_gradients()
    torch.testing.assert_close(centring.mean, torch.lerp(first_mean, batch_mean, MOMENTUM))


def test_the_mean_is_not_recorded_outside_training_and_round_trips():
    module = front(channels=64)
    centring = CentredInputs(module, SINGLE)
    mel = torch.rand(1, 16, 32)
    module.eval()
    module(mel, torch.tensor([16]))
    module.train()
    with torch.no_grad():
        module(mel, torch.tensor([16]))
    centring.centre_gradients()
    assert centring.steps == 0 and not centring.mean.any()
    module(mel, torch.tensor([16]))
    centring.centre_gradients()
    restored = CentredInputs(front(channels=64), SINGLE)
    restored.load_state_dict(centring.state_dict())
    assert restored.steps == 1 and torch.equal(restored.mean, centring.mean)
