"""Targeted L-inf PGD as used for training and evaluation in the paper (Section 3).

Images live in [0, 1]; eps and step size are given on the paper's 0-255 scale and divided by 255 here, so
"eps 16, step 1" means the same thing for any input range the data loader produces.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

PIXEL_SCALE = 255.0


def random_targets(labels: torch.Tensor, num_classes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A target class uniform over the classes other than the true one.

    The paper draws the target "uniformly at random" (Section 3); we exclude the true class, as its
    predecessor (Kannan et al. 2018) does, because a target equal to the label makes the attack a no-op.
    Adding an offset in [1, K-1] modulo K is uniform over the K-1 other classes.
    """
    # Drawn where the generator lives (the CPU unless the attack passes its GPU generator), then moved.
    where = generator.device if generator is not None else torch.device("cpu")
    offset = torch.randint(1, num_classes, labels.shape, generator=generator, device=where).to(labels.device)
    return (labels + offset) % num_classes


def _draws_for(device: torch.device, generator: torch.Generator | None) -> tuple[torch.Generator | None, torch.device]:
    """The generator the attack's random draws come from, and where they are drawn, for images on `device`.

    On the CPU: `generator` itself, so CPU runs keep their exact random streams. On a GPU: a generator on the GPU
    seeded by one draw from `generator`. Drawing on the CPU and copying would cost a CPU pass over every pixel and
    a blocking host-to-device copy (which waits for the GPU to drain its queue) at every training step; one seed
    keeps the attack reproducible from `generator`'s state alone, which is what checkpoints store.
    """
    if device.type == "cpu":
        return generator, device
    if generator is None:
        return None, device
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    return torch.Generator(device=device).manual_seed(seed), device


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[object]:
    """Autocast to `dtype` on `device`'s kind of device, or nothing (fp32) when `dtype` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def memory_format_of(images: torch.Tensor) -> torch.memory_format:
    """Channels-last when the images are (the GPU path); the attack keeps its iterates in the same layout."""
    if images.dim() == 4 and not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@torch.enable_grad()
def pgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    steps: int,
    eps: float,
    step_size: float,
    clean_start_prob: float = 0.0,
    targeted: bool = True,
    targets: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Return adversarial images for `images` (in [0, 1]); `eps`, `step_size` on the 0-255 scale.

    - Targeted (default): minimise the cross-entropy to a random other class; untargeted: maximise it on the label.
    - Start (Section 3, training): the clean image with probability `clean_start_prob` (paper: 0.2), else uniform
      in the eps-cube. The coin is tossed per image, so a batch mixes both starts in the paper's proportion even
      at per-worker batch 32. Evaluation uses `clean_start_prob=0` (always random start, as in Section 3).
    - Each step moves by step_size * sign(grad) and projects onto the eps-box and the valid pixel range.
    - Only the input gets a gradient (`torch.autograd.grad` w.r.t. the input): no weight .grad is written, and
      the caller passes a module outside DDP, so no all-reduce happens during the attack. The training loop and
      the evaluation pass the network's BN-folded copy (`workloads.bn_fold`: the same function with fewer
      layers), or the `torch.compile`d network (compiled code folds eval-mode BN itself).
    - BN runs in inference mode during the attack (docs/design.md section 5: the attack must not see or change batch
      statistics); the model's train/eval mode is restored afterwards.
    - `amp_dtype` (bf16): each iteration's forward runs under autocast; the loss is taken on fp32 logits, and the
      image, its gradient, the sign step and the projection stay fp32, so the eps-box and pixel range are exact.
      bf16 keeps fp32's exponent range, so small input gradients underflow no sooner than in fp32 and need no loss
      scaling (the fp16 attack of the paper's pipeline scaled its loss by 128); only each gradient's sign is used.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    eps_px, step_px = eps / PIXEL_SCALE, step_size / PIXEL_SCALE
    images = images.detach()
    draw, where = _draws_for(images.device, generator)
    if targeted and targets is None:
        targets = random_targets(labels, num_classes, draw)
    goal = targets if targeted else labels
    assert goal is not None

    noise = (torch.rand(images.shape, generator=draw, device=where) * 2 - 1).to(images) * eps_px
    if clean_start_prob > 0:
        coin = torch.rand(images.shape[0], generator=draw, device=where).to(images.device)
        keep_clean = (coin < clean_start_prob).view(-1, *([1] * (images.dim() - 1)))
        noise = torch.where(keep_clean, torch.zeros_like(noise), noise)
    layout = memory_format_of(images)
    adv = (images + noise).clamp(0, 1).contiguous(memory_format=layout)
    if steps == 0:
        return adv.detach()

    was_training = model.training
    model.eval()
    try:
        for _ in range(steps):
            adv.requires_grad_(True)
            with autocast(images.device, amp_dtype):
                logits = model(adv)
            loss = F.cross_entropy(logits.float() if amp_dtype is not None else logits, goal)
            (grad,) = torch.autograd.grad(loss, adv)
            # Targeted: descend towards the target class; untargeted: ascend away from the label.
            direction = -grad.sign() if targeted else grad.sign()
            adv = adv.detach() + step_px * direction
            adv = torch.min(torch.max(adv, images - eps_px), images + eps_px).clamp(0, 1)
            adv = adv.contiguous(memory_format=layout)  # a no-op unless an op above changed the layout
    finally:
        model.train(was_training)
    return adv.detach()
