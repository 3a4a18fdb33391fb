"""Targeted L-inf PGD as used for training and evaluation in the paper (Section 3).

Images live in [0, 1]; eps and step size are given on the paper's 0-255 scale and divided by 255 here, so
"eps 16, step 1" means the same thing for any input range the data loader produces.
"""

from __future__ import annotations

from collections.abc import Callable

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
    offset = torch.randint(1, num_classes, labels.shape, generator=generator, device="cpu").to(labels.device)
    return (labels + offset) % num_classes


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
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Return adversarial images for `images` (in [0, 1]); `eps`, `step_size` on the 0-255 scale.

    - Targeted (default): minimise the cross-entropy to a random other class; untargeted: maximise it on the label.
    - Start (Section 3, training): the clean image with probability `clean_start_prob` (paper: 0.2), else uniform
      in the eps-cube. The coin is tossed per image, so a batch mixes both starts in the paper's proportion even
      at per-worker batch 32. Evaluation uses `clean_start_prob=0` (always random start, as in Section 3).
    - Each step moves by step_size * sign(grad) and projects onto the eps-box and the valid pixel range.
    - Only the input gets a gradient (`torch.autograd.grad` w.r.t. the input): no weight .grad is written, and
      the caller passes the bare module so no DDP all-reduce happens during the attack.
    - BN runs in inference mode during the attack (DESIGN section 5: the attack must not see or change batch
      statistics); the model's train/eval mode is restored afterwards.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    eps_px, step_px = eps / PIXEL_SCALE, step_size / PIXEL_SCALE
    images = images.detach()
    if targeted and targets is None:
        targets = random_targets(labels, num_classes, generator)
    goal = targets if targeted else labels
    assert goal is not None

    noise = (torch.rand(images.shape, generator=generator, device="cpu") * 2 - 1).to(images) * eps_px
    if clean_start_prob > 0:
        coin = torch.rand(images.shape[0], generator=generator, device="cpu").to(images.device)
        keep_clean = (coin < clean_start_prob).view(-1, *([1] * (images.dim() - 1)))
        noise = torch.where(keep_clean, torch.zeros_like(noise), noise)
    adv = (images + noise).clamp(0, 1)
    if steps == 0:
        return adv.detach()

    if forward is not None:
        call = forward
    else:
        # A ResNet attacks through a BN-folded copy of itself: the same function, fewer layers per iteration.
        fold = getattr(model, "folded_for_attack", None)
        call = fold() if callable(fold) else model
    was_training = model.training
    model.eval()
    try:
        for _ in range(steps):
            adv.requires_grad_(True)
            loss = F.cross_entropy(call(adv), goal)
            (grad,) = torch.autograd.grad(loss, adv)
            # Targeted: descend towards the target class; untargeted: ascend away from the label.
            direction = -grad.sign() if targeted else grad.sign()
            adv = adv.detach() + step_px * direction
            adv = torch.min(torch.max(adv, images - eps_px), images + eps_px).clamp(0, 1)
    finally:
        model.train(was_training)
    return adv.detach()
