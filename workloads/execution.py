"""How a worker's arithmetic runs on its device (TrainConfig.performance; docs/precision.md), and the
distributed plumbing around the single-device model: DDP wrapping, torch.compile, batches sent to the device,
all-reduced counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from workloads.augment import GREY
from workloads.config import PerformanceConfig
from workloads.models import ResNet

# The torch.compile backend. Tests swap in "aot_eager": the same graph capture and forward/backward split, without
# inductor's code generation, which takes minutes on two CPU cores.
COMPILE_BACKEND = "inductor"


@dataclass(frozen=True)
class Execution:
    """The device-side choices of one worker, resolved from `cfg.performance` and its device.

    On the CPU everything is off (fp32 unless bf16 is asked for explicitly, contiguous NCHW, no cuDNN), so CPU
    runs compute exactly what they computed before these options existed.
    """

    device: torch.device
    precision: Literal["fp32", "bf16"]
    channels_last: bool
    compile: bool
    graph_attack: bool = False

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype of the forward passes (training and attack); None: fp32 throughout."""
        return torch.bfloat16 if self.precision == "bf16" else None

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def resolve_execution(performance: PerformanceConfig, device: torch.device) -> Execution:
    """`performance` on `device`: "auto" precision is bf16 on a GPU with bf16 tensor cores, else fp32.

    Compute capability 8.0 (A100) and up have bf16 tensor cores; on older GPUs (V100, T4) bf16 is emulated and
    slower than fp32, so "auto" stays fp32 there (an explicit "bf16" is still honoured). Channels-last only on
    CUDA: cuDNN's tensor-core convolutions are NHWC-native, while on the CPU it would change the reference numbers.
    """
    cuda = device.type == "cuda"
    tensor_cores = cuda and torch.cuda.get_device_capability(device) >= (8, 0)
    return Execution(
        device=device,
        precision=performance.resolved_precision(device.type, tensor_cores),
        channels_last=cuda,
        compile=performance.compile,
        graph_attack=performance.graph_attack,
    )


def configure_backends(execution: Execution) -> None:
    """Process-wide CUDA settings for a cell's worker process (nothing on the CPU)."""
    if execution.device.type != "cuda":
        return
    # A cell's shapes are fixed (the attack batch, the training batch, the eval batch), so timing cuDNN's candidate
    # algorithms once per shape pays for itself within the first steps. (It also makes GPU runs non-bit-exact
    # from run to run; CPU runs stay exact.)
    torch.backends.cudnn.benchmark = True
    if execution.precision == "fp32":
        # fp32 is the reference: IEEE fp32 arithmetic, not the TF32 tensor cores cuDNN uses for fp32
        # convolutions by default (inputs rounded to 10 mantissa bits, between bf16's 7 and fp32's 23).
        set_fp32_precision(("ieee", "ieee"))


def fp32_precision() -> tuple[str, str]:
    """(cuDNN convolutions, CUDA matmuls) fp32 precision: "tf32" or "ieee" ("none": torch's default)."""
    return torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision  # type: ignore[attr-defined]


def set_fp32_precision(value: tuple[str, str]) -> None:
    # The fp32_precision API, never the legacy allow_tf32 flags: torch refuses to read flags set through both.
    torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = value  # type: ignore[attr-defined]


@contextmanager
def ieee_fp32(device: torch.device) -> Iterator[None]:
    """Evaluation runs in IEEE fp32 on every cell, whatever its training precision (docs/precision.md)."""
    if device.type != "cuda":
        yield
        return
    saved = fp32_precision()
    set_fp32_precision(("ieee", "ieee"))
    try:
        yield
    finally:
        set_fp32_precision(saved)


# Backend calls per named graph since the last `reset_compile_counts`: "train" (the training forward and its
# backward, one call per graph dynamo captures) and "attack" (the BN-folded copy PGD differentiates). A call after
# the first of a graph is a recompilation (a guard failed: a mode switch, a new shape, a replaced tensor).
_GRAPH_COMPILES: Counter[str] = Counter()


def compile_model(model: nn.Module, graph: str = "train") -> nn.Module:
    """`torch.compile(model)` with the project's backend (inductor; tests use a cheaper one), its compilations
    counted under `graph` (`compile_counts`)."""
    return torch.compile(model, backend=_counting_backend(graph))  # type: ignore[return-value]


def _counting_backend(graph: str) -> Callable[..., Any]:
    def compile_graph(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        _GRAPH_COMPILES[graph] += 1
        # Looked up at compile time, so a test's swap of COMPILE_BACKEND applies to modules compiled before it.
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(COMPILE_BACKEND)(gm, example_inputs)

    return compile_graph


def compile_counts() -> dict[str, int]:
    """How often each named graph was compiled ("train", "attack"; under DDP, DDPOptimizer compiles the training
    graph in one piece per gradient bucket), and dynamo's own totals: frames it converted and graphs it captured,
    over every compiled module of the process. After warm-up these stop growing; a count that keeps growing is a
    recompilation per step."""
    from torch._dynamo.utils import counters

    return {
        **{f"{graph}_graphs": _GRAPH_COMPILES[graph] for graph in sorted({"train", "attack", *_GRAPH_COMPILES})},
        "dynamo_frames": counters["frames"]["ok"],
        "dynamo_graphs": counters["stats"]["unique_graphs"],
    }


def reset_compile_counts() -> None:
    """Zero `compile_counts` (dynamo's compiled code stays cached; `torch._dynamo.reset()` drops that)."""
    from torch._dynamo.utils import counters

    _GRAPH_COMPILES.clear()
    counters["frames"].clear()
    counters["stats"].clear()


def data_parallel(network: ResNet, grad_accum_steps: int, compiled: bool = False) -> nn.Module:
    """`network` wrapped for DDP as `run` wraps it (compiled after wrapping, so DDPOptimizer can split the graph at
    gradient-bucket boundaries and overlap the all-reduce with the backward).

    MBN with clean ratio 0 never uses the clean branch, so DDP must be told some parameters may go unused.
    `static_graph` (gradients bucketed in the order recorded in the first step, no per-step graph search) only
    where it is valid: every parameter used in every step (not MBN), no gradient accumulation (DDP's reducer
    trips an internal assert on `no_sync` + `static_graph` in torch 2.13, pytorch/pytorch#143580), and not under
    torch.compile (DDPOptimizer does not support it, pytorch/pytorch#109261).
    """
    static = not network.has_mbn and grad_accum_steps == 1 and not compiled
    ddp = nn.parallel.DistributedDataParallel(network, find_unused_parameters=network.has_mbn, static_graph=static)
    return compile_model(ddp, "train") if compiled else ddp


def apply_colour(pixels: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Colour maps (`workloads.augment.colour_map`, one row per image) applied to uint8 (B, C, H, W) pixels where
    they are: x -> a x + b (g . x) + u + v m, m the image's mean grey, rounded and clipped to 0-255 as the
    decoding processes' PIL path does (float32, still on the 0-255 scale). The mean is exact here, the PIL path
    takes it from 8 x 8 box averages; ties round to even here, up there."""
    channels = pixels.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"colour maps apply to 1- or 3-channel images, not {channels}")
    x = pixels.to(torch.float32)
    maps = maps.to(device=x.device, dtype=torch.float32)
    # Python-number weights: no tensor to copy to the device on every batch.
    grey = x[:, 0:1] * GREY[0] + x[:, 1:2] * GREY[1] + x[:, 2:3] * GREY[2] if channels == 3 else x
    mean = grey.mean(dim=(1, 2, 3))
    shift = maps[:, 2 : 2 + channels] + maps[:, 5 : 5 + channels] * mean[:, None]
    a, b = maps[:, 0, None, None, None], maps[:, 1, None, None, None]
    # A greyscale image is its own grey: a x + b x.
    out = x * a + grey * b if channels == 3 else x * (a + b)
    return out.add_(shift[:, :, None, None]).round_().clamp_(0, 255)


def to_unit_range(pixels: torch.Tensor, colour: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 pixels as float32 in [0, 1] (the reader's batches), after their ``colour`` maps when the reader left
    those to the device; float batches pass through."""
    if pixels.dtype != torch.uint8:
        if colour is not None:
            raise ValueError("colour maps come with uint8 pixels; these are already scaled")
        return pixels
    if colour is not None:
        return apply_colour(pixels, colour).div_(255.0)
    return pixels.to(torch.float32).div_(255.0)


def on_device(
    batches: Iterator[tuple[torch.Tensor, ...]], execution: Execution
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training batches on the worker's device, in its memory format, pixels scaled from uint8 to [0, 1]
    (after their colour maps, for a reader that left them to the device: batches of three).

    On a GPU, batch k+1 is sent from pinned memory (where the reader put it, `data.iter_batches(pinned=True)`;
    a pageable batch is copied there first), still uint8 (a quarter of float32's bytes), on a side stream while
    batch k trains, and scaled there, so the copy overlaps compute and never blocks the host; the compute stream
    waits for it only when it uses the batch. On the CPU the batches are only scaled, in the layout the CPU
    trains in (a channels-last batch, as a GPU worker's reader delivers them, is transposed while still uint8).
    """
    device = execution.device
    if device.type != "cuda":
        for images, labels, *colour in batches:
            yield to_unit_range(images.contiguous(memory_format=execution.memory_format), *colour), labels
        return
    stream = torch.cuda.Stream(device=device)

    def upload(batch: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        if batch is None:
            return None
        images, labels, *colour = batch
        with torch.cuda.stream(stream):
            images = images.pin_memory().to(device, non_blocking=True)
            colour = [maps.pin_memory().to(device, non_blocking=True) for maps in colour]
            images = to_unit_range(images, *colour).contiguous(memory_format=execution.memory_format)
            labels = labels.pin_memory().to(device, non_blocking=True)
        return images, labels

    try:
        pending = upload(next(batches, None))
        while pending is not None:
            compute = torch.cuda.current_stream(device)
            compute.wait_stream(stream)
            images, labels = pending
            # Allocated on the side stream, used on the compute stream: keep the memory until the latter is done.
            images.record_stream(compute)
            labels.record_stream(compute)
            pending = upload(next(batches, None))
            yield images, labels
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def all_reduce(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
