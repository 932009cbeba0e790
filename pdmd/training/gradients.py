"""One adapter's gradients between the backward pass and the optimizer step, in the order several processes and
fp16 need: all-reduced (with the loss), unscaled (fp16's GradScaler), then clipped. Only the adapters train, so the
all-reduce is all DDP would do; after it every rank holds the same gradients and unscales them by the same scale,
so every rank clips, skips or stops alike."""
from __future__ import annotations

import torch
from torch import Tensor


def average_gradients(accelerator, params: list[torch.nn.Parameter], loss: Tensor) -> Tensor:
    """The parameters' gradients averaged over the processes, and the mean loss with them in the same call: it is
    non-finite on every rank when it is on any."""
    if accelerator.num_processes == 1:
        return loss.detach()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads] + [loss.detach().reshape(1).to(grads[0].dtype)])
    flat = accelerator.reduce(flat, reduction="mean")
    for p, g in zip(params, flat[:-1].split([p.numel() for p in params])):
        p.grad = g.view_as(p)
    return flat[-1]


def clip_gradients(accelerator, optimizer, params: list[torch.nn.Parameter], max_norm: float) -> Tensor:
    """Clip the true gradients (fp16: unscaled first) to ``max_norm``; their norm before clipping. Only this
    optimizer's are unscaled: accelerator.clip_grad_norm_ would unscale every prepared optimizer."""
    accelerator.unscale_gradients(optimizer)  # a no-op without a GradScaler
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
