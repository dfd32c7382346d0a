"""Train the subsampling's output Linear as if its inputs were centred.

The Linear after the convolution front (`encoder.pre_encode.out`) reads post-ReLU features
whose mean is several times their spread (at init, ||mean||^2 = 7.75x the summed variance).
Plain gradient steps on such inputs mostly move the outputs' common offset, and caster's
encoder stayed on the CTC blank plateau from scratch; stacked mel frames shifted by +3 did
the same, unshifted ones did not.

Centring reparametrises y = W x + b as y = W (x - mu) + c with c = b + W mu, mu the running
mean of x, and lets the optimizer step on (W, c): the gradient of W becomes g_W - g_b mu^T,
c takes b's gradient (and b's optimizer state), and after the step b = c - W mu, i.e.
b -= (W_new - W_old) mu. The model itself is unchanged (plain W and b under NeMo's keys), so
it needs no folding at export; mu is part of the training state for an exact resume.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from caster.encoder import ConvSubsampling
from caster.train.distributed import DistInfo, all_reduce_sum

# Weight of the newest step's mean in the running mean.
MOMENTUM = 0.01


class CentredInputs:
    """Running mean of a ConvSubsampling's Linear inputs and the step transform it implies.

    Hooks on the front record each training forward (frames past an utterance's length are
    not counted); per optimizer step call `centre_gradients()` after backward (before
    clipping), then `correct_bias()` after the step.
    """

    def __init__(self, front: ConvSubsampling, info: DistInfo) -> None:
        self.linear = front.out
        self.info = info
        self.mean = torch.zeros(front.out.in_features, device=front.out.weight.device)
        self.steps = 0  # steps folded into `mean` (the first one sets it)
        # This step's valid input frames, summed, and their count (over micro-batches, then
        # processes: the mean does not depend on how the step's batch is split).
        self._sum = torch.zeros(self.mean.numel() + 1, device=self.mean.device)
        self._inputs: Tensor | None = None
        self._weight_before: Tensor | None = None
        front.out.register_forward_pre_hook(self._keep_inputs)
        front.register_forward_hook(self._record_inputs)

    def _keep_inputs(self, module: nn.Module, args: tuple[Tensor]) -> None:
        recording = module.training and torch.is_grad_enabled()
        self._inputs = args[0].detach() if recording else None

    def _record_inputs(
        self, module: nn.Module, args: tuple[Tensor, Tensor], output: tuple[Tensor, Tensor]
    ) -> None:
        """After the front's forward: its output lengths say which inputs were frames."""
        if self._inputs is None:
            return
        x = self._inputs.float()  # (B, T', C*F')
        lengths = output[1]
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]  # (B, T')
        self._sum[:-1] += (x * valid[..., None]).sum((0, 1))
        self._sum[-1] += valid.sum()
        self._inputs = None

    def centre_gradients(self) -> None:
        """Fold this step's batches into the mean and centre the Linear's weight gradient."""
        totals = all_reduce_sum(self._sum, self.info)
        self._sum.zero_()
        if totals[-1] > 0:
            step_mean = totals[:-1] / totals[-1]
            if self.steps == 0:
                self.mean.copy_(step_mean)
            else:
                self.mean.lerp_(step_mean, MOMENTUM)
            self.steps += 1
        weight, bias = self.linear.weight, self.linear.bias
        if weight.grad is None or bias.grad is None or self.steps == 0:
            self._weight_before = None
            return
        weight.grad.sub_(torch.outer(bias.grad, self.mean.to(weight.grad.dtype)))
        self._weight_before = weight.detach().clone()

    @torch.no_grad()
    def correct_bias(self) -> None:
        """After the optimizer step: b -= (W_new - W_old) mu keeps c = b + W mu as stepped."""
        if self._weight_before is None:
            return
        weight = self.linear.weight
        delta = (weight - self._weight_before).float() @ self.mean  # (D,)
        self.linear.bias.sub_(delta.to(self.linear.bias.dtype))
        self._weight_before = None

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.cpu().clone(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mean = torch.as_tensor(state["mean"], dtype=torch.float32)
        if mean.shape != self.mean.shape:
            shape, expected = tuple(mean.shape), tuple(self.mean.shape)
            raise ValueError(f"centring mean of shape {shape}, not {expected}")
        self.mean.copy_(mean)
        self.steps = int(state["steps"])
