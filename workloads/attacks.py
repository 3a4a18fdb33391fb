"""Targeted L-inf PGD as used for training and evaluation in the paper (Section 3).

Images live in [0, 1]; eps and step size are given on the paper's 0-255 scale and divided by 255 here, so
"eps 16, step 1" means the same thing for any input range the data loader produces.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

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


def autocast(
    device: torch.device, dtype: torch.dtype | None, *, cache_casts: bool = True
) -> contextlib.AbstractContextManager[object]:
    """Autocast to `dtype` on `device`'s kind of device, or nothing (fp32) when `dtype` is None. `cache_casts`
    False: every forward casts the weights again (what a captured CUDA graph must do; the same numbers)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache_casts)


def memory_format_of(images: torch.Tensor) -> torch.memory_format:
    """Channels-last when the images are (the GPU path); the attack keeps its iterates in the same layout."""
    if images.dim() == 4 and not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@dataclass(frozen=True)
class _Schedule:
    """One attack's fixed settings, eps and step on the [0, 1] scale."""

    steps: int
    eps: float
    step: float
    clean_start_prob: float
    targeted: bool
    amp_dtype: torch.dtype | None


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
      layers, weights that need no gradient), compiled as a graph of its own when the cell compiles.
    - `model` a `GraphedAttack`: the same attack from the same random draws, run as one captured CUDA graph.
    - BN runs in inference mode during the attack (docs/design.md section 5: the attack must not see or change batch
      statistics); the model's train/eval mode is restored afterwards.
    - `amp_dtype` (bf16): each iteration's forward runs under autocast; the loss is taken on fp32 logits, and the
      image, its gradient, the sign step and the projection stay fp32, so the eps-box and pixel range are exact.
      bf16 keeps fp32's exponent range, so small input gradients underflow no sooner than in fp32 and need no loss
      scaling (the fp16 attack of the paper's pipeline scaled its loss by 128); only each gradient's sign is used.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    schedule = _Schedule(steps, eps / PIXEL_SCALE, step_size / PIXEL_SCALE, clean_start_prob, targeted, amp_dtype)
    images = images.detach()
    goal, noise, coin = _draw(images, labels, num_classes, schedule, targets, generator)
    if steps == 0:
        return _attack(model, images, goal, noise, coin, schedule)

    was_training = model.training
    model.eval()
    try:
        if isinstance(model, GraphedAttack):
            return model.run(images, goal, noise, coin, schedule)
        return _attack(model, images, goal, noise, coin, schedule)
    finally:
        model.train(was_training)


@torch.enable_grad()
def pgd_curve(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    record_at: Iterable[int],
    num_classes: int,
    eps: float,
    step_size: float,
    targeted: bool = True,
    targets: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    amp_dtype: torch.dtype | None = None,
) -> dict[int, torch.Tensor]:
    """`pgd`'s adversarial images after k steps, for every k in `record_at`, from one run to the largest k.

    PGD-k from the same random start, targets and step size is the first k steps of PGD-K for K > k, so one
    trajectory gives the whole PGD curve (evaluation: 10 to 2000 steps, Section 3) for the cost of its longest
    attack: each entry equals `pgd(..., steps=k)` with a generator in the same state. Random start always (the
    evaluation's start, `clean_start_prob=0`).
    """
    wanted = sorted(set(record_at))
    if not wanted or wanted[0] < 0:
        raise ValueError(f"record_at must hold step counts >= 0, got {wanted}")
    schedule = _Schedule(wanted[-1], eps / PIXEL_SCALE, step_size / PIXEL_SCALE, 0.0, targeted, amp_dtype)
    images = images.detach()
    goal, noise, _ = _draw(images, labels, num_classes, schedule, targets, generator)
    was_training = model.training
    model.eval()
    try:
        steps = _iterates(model, images, goal, noise, None, schedule)
        return {k: adv for k, adv in enumerate(steps) if k in wanted}
    finally:
        model.train(was_training)


def _draw(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    schedule: _Schedule,
    targets: torch.Tensor | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The attack's goal (targets, or the labels untargeted) and its random draws: start noise, clean-start coins."""
    draw, where = _draws_for(images.device, generator)
    if schedule.targeted and targets is None:
        targets = random_targets(labels, num_classes, draw)
    goal = targets if schedule.targeted else labels
    assert goal is not None
    # Every random draw happens here, before the attack proper: a captured attack replays the same kernels with
    # these numbers as its inputs, so both paths take the same draws from `generator`.
    noise = torch.rand(images.shape, generator=draw, device=where)
    coin = torch.rand(images.shape[0], generator=draw, device=where) if schedule.clean_start_prob > 0 else None
    return goal, noise, coin


def _attack(
    model: nn.Module,
    images: torch.Tensor,
    goal: torch.Tensor,
    noise: torch.Tensor,
    coin: torch.Tensor | None,
    schedule: _Schedule,
    *,
    cache_casts: bool = True,
) -> torch.Tensor:
    """The attack from its random draws (`noise` uniform in [0, 1) per pixel, `coin` per image): no host-device
    synchronisation and no branch on a tensor's value, so that it can be captured as one CUDA graph."""
    (last,) = collections.deque(_iterates(model, images, goal, noise, coin, schedule, cache_casts=cache_casts), 1)
    return last


def _iterates(
    model: nn.Module,
    images: torch.Tensor,
    goal: torch.Tensor,
    noise: torch.Tensor,
    coin: torch.Tensor | None,
    schedule: _Schedule,
    *,
    cache_casts: bool = True,
) -> Iterator[torch.Tensor]:
    """The start, then the images after each of the schedule's steps."""
    noise = (noise * 2 - 1).to(images) * schedule.eps
    if coin is not None:
        keep_clean = (coin.to(images.device) < schedule.clean_start_prob).view(-1, *([1] * (images.dim() - 1)))
        noise = torch.where(keep_clean, torch.zeros_like(noise), noise)
    layout = memory_format_of(images)
    adv = (images + noise).clamp(0, 1).contiguous(memory_format=layout)
    yield adv.detach()
    for _ in range(schedule.steps):
        adv.requires_grad_(True)
        with autocast(images.device, schedule.amp_dtype, cache_casts=cache_casts):
            logits = model(adv)
        loss = F.cross_entropy(logits.float() if schedule.amp_dtype is not None else logits, goal)
        (grad,) = torch.autograd.grad(loss, adv)
        # Targeted: descend towards the target class; untargeted: ascend away from the label.
        direction = -grad.sign() if schedule.targeted else grad.sign()
        adv = adv.detach() + schedule.step * direction
        adv = torch.min(torch.max(adv, images - schedule.eps), images + schedule.eps).clamp(0, 1)
        adv = adv.contiguous(memory_format=layout)  # a no-op unless an op above changed the layout
        yield adv.detach()


class GraphedAttack(nn.Module):
    """`model` for `pgd`, which then runs the whole attack (the start from its random draws, every PGD step) as one
    CUDA graph per batch shape and schedule: captured at the first attack of that shape, replayed afterwards.

    A PGD-N step of ResNet-50 is several hundred kernel launches per iteration, each a few microseconds of host
    time; at batch 32 on an H100 many kernels finish faster than the host launches them. One replay launches the
    whole attack. What a replay reads lives at fixed addresses: the batch, its targets and random draws are copied
    into the program's own input tensors, and `model`'s weights are refreshed in place (`FoldedForAttack`), never
    replaced, so the graph always sees the current ones. On the CPU the same program runs uncaptured, from the
    same input tensors.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._programs: dict[tuple[object, ...], _StaticAttack] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @property
    def programs(self) -> int:
        """How many static attacks (batch shapes x schedules) this module holds."""
        return len(self._programs)

    def run(
        self,
        images: torch.Tensor,
        goal: torch.Tensor,
        noise: torch.Tensor,
        coin: torch.Tensor | None,
        schedule: _Schedule,
    ) -> torch.Tensor:
        key = (schedule, tuple(images.shape), images.dtype, images.device, memory_format_of(images), coin is None)
        program = self._programs.get(key)
        if program is None:
            program = self._programs[key] = _StaticAttack(self.model, schedule, images, goal, noise, coin)
        return program(images, goal, noise, coin)


class _StaticAttack:
    """`_attack` on input tensors of its own, captured as a CUDA graph where the batch lives on a GPU."""

    WARMUP = 3  # uncaptured runs first, on a side stream: compilation, cuDNN's algorithm search, allocator pools

    def __init__(
        self,
        model: nn.Module,
        schedule: _Schedule,
        images: torch.Tensor,
        goal: torch.Tensor,
        noise: torch.Tensor,
        coin: torch.Tensor | None,
    ) -> None:
        self.model = model
        self.schedule = schedule
        self.inputs = [t.detach().clone() for t in (images, goal, noise, coin) if t is not None]
        self.capture = images.device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None

    def _program(self) -> torch.Tensor:
        images, goal, noise, *coin = self.inputs
        # A captured graph replays its casts: autocast's weight-cast cache would hand out casts from the capture.
        return _attack(
            self.model, images, goal, noise, coin[0] if coin else None, self.schedule, cache_casts=not self.capture
        )

    def __call__(
        self, images: torch.Tensor, goal: torch.Tensor, noise: torch.Tensor, coin: torch.Tensor | None
    ) -> torch.Tensor:
        batch = [t for t in (images, goal, noise, coin) if t is not None]
        for static, value in zip(self.inputs, batch, strict=True):
            static.copy_(value)
        if not self.capture:
            return self._program()
        if self.graph is None:
            self._capture(images.device)
        assert self.graph is not None and self.output is not None
        self.graph.replay()
        # The next replay overwrites the graph's output; the caller keeps the images past it.
        return self.output.clone()

    def _capture(self, device: torch.device) -> None:
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                self._program()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.output = self._program()
        self.graph = graph
