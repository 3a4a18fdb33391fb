"""One grid cell: adversarial training of a ResNet, then evaluation against a PGD curve.

`train_loop_per_worker` is the function a `ray.train.torch.TorchTrainer` runs on every worker (DDP); `main` runs
the same loop in one process without Ray, for debugging a cell: `python -m workloads.train CELL.json --out DIR`.
Both go through `run`, so there is one training loop for every strategy.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from workloads import data
from workloads.attacks import autocast, memory_format_of, pgd, random_targets
from workloads.config import PerformanceConfig, RecipeConfig, TrainConfig
from workloads.fs import process_exists, with_retries
from workloads.models import ResNet, build_model, use_channels_last

STATE_FILE = "state.pt"
# Rank 0's local checkpoint folders: PREFIX + the worker's process id + "-" + a random suffix (see RaySession).
CHECKPOINT_SCRATCH_PREFIX = "sweep-checkpoint-"
# Fault injection for the test suite's fault matrix (a real failure in a real worker, not a mock). JSON, one fault
# or a list: {"seed": S, "epoch": E, "kind": "raise" | "nan" | "sigkill", "rank": R?, "once_file": PATH?}. In
# cells with seed S, halfway through epoch E (1-based), on rank R (default: every rank): raise an error, make the
# loss non-finite from there on, or SIGKILL the worker's own process (what the kernel's OOM killer or a lost node
# does to it). With `once_file` the fault fires only if it can create that file, so a retry can succeed.
FAULT_ENV = "SWEEP_INJECT_FAULT"
# The torch.compile backend. Tests swap in "aot_eager": the same graph capture and forward/backward split, without
# inductor's code generation, which takes minutes on two CPU cores.
_COMPILE_BACKEND = "inductor"


class Session:
    """Where a run reports to and checkpoints to: Ray Train, or a local folder for the single-process entry."""

    rank = 0
    world_size = 1

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def latest_state(self) -> dict[str, Any] | None:
        raise NotImplementedError

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        """Called by every rank (Ray's report is a barrier); `state` is saved as a checkpoint when given."""
        raise NotImplementedError


class LocalSession(Session):
    """Single process, checkpoints as `<out>/checkpoint_<epoch>/state.pt`, metrics appended to metrics.jsonl."""

    def __init__(self, out_dir: Path, use_gpu: bool = False) -> None:
        self.out_dir = out_dir
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.history: list[dict[str, Any]] = []

    @property
    def device(self) -> torch.device:
        return self._device

    def latest_state(self) -> dict[str, Any] | None:
        saved = sorted(self.out_dir.glob("checkpoint_*/" + STATE_FILE), key=lambda p: int(p.parent.name[11:]))
        return _first_readable((str(p.parent), partial(_load_state, p)) for p in reversed(saved))

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        self.history.append(metrics)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if state is not None:
            folder = self.out_dir / f"checkpoint_{state['epoch']:06d}"
            folder.mkdir(exist_ok=True)
            tmp = folder / (STATE_FILE + ".tmp")
            torch.save(state, tmp)
            tmp.replace(folder / STATE_FILE)  # publish atomically: a crash leaves the old or the new state


class RaySession(Session):
    def __init__(self) -> None:
        import ray.train
        import ray.train.torch
        from ray.train.v2._internal.execution import context as train_context

        # Ray Train 2.60 logs every report at INFO ("Reporting training result N: TrainingReport(...)", hundreds of
        # characters per epoch per cell, forwarded into the sweep's log) through a logger named after its source
        # file, outside the "ray.train" logger that the runner's LoggingConfig(log_level="WARNING") quiets.
        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
        self._train = ray.train
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        # Fake GPUs (scheduling tests, DESIGN section 6) get GPU ids but no CUDA: train on the CPU there.
        self._device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
        for folder in remove_orphaned_checkpoint_folders():
            print(f"removed {folder}, a checkpoint folder left by a worker that died before uploading it")

    @property
    def device(self) -> torch.device:
        return self._device

    def latest_state(self) -> dict[str, Any] | None:
        latest = self._train.get_checkpoint()
        if latest is None:
            return None
        return _first_readable((c.path, partial(self._load, c)) for c in self._newest_first(latest))

    def _newest_first(self, latest: Any) -> list[Any]:
        """The latest checkpoint, then its older siblings in the run folder (names sort by creation time)."""
        import pyarrow.fs

        parent = latest.path.rstrip("/").rsplit("/", 1)[0]
        try:
            infos = with_retries(
                lambda: latest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent)), f"list {parent}"
            )
        except OSError:
            return [latest]
        older = sorted(
            (
                i.path
                for i in infos
                if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_")
            ),
            reverse=True,
        )
        return [latest] + [
            self._train.Checkpoint(path, filesystem=latest.filesystem) for path in older if path != latest.path
        ]

    @staticmethod
    def _load(checkpoint: Any) -> dict[str, Any]:
        # A store that is down is retried here, so that only a checkpoint that really is unreadable (truncated,
        # corrupt) sends `_first_readable` on to an older one.
        def download() -> dict[str, Any]:
            with checkpoint.as_directory() as folder:
                return _load_state(Path(folder) / STATE_FILE)

        return with_retries(download, f"read checkpoint {checkpoint.path}")

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        if state is None or self.rank != 0:
            self._train.report(metrics)
            return
        # Training waits only for the local write of the state; the upload runs in Ray Train's upload thread
        # (ASYNC), in report order, and the worker waits for pending uploads before it finishes. A worker lost
        # mid-upload loses that checkpoint only: the previous one is complete in storage (each object is one
        # PUT, or a multipart upload that becomes visible only when completed).
        folder = tempfile.mkdtemp(prefix=f"{CHECKPOINT_SCRATCH_PREFIX}{os.getpid()}-")
        torch.save(state, Path(folder) / STATE_FILE)
        self._train.report(
            metrics,
            checkpoint=self._train.Checkpoint.from_directory(folder),
            checkpoint_upload_mode=self._train.CheckpointUploadMode.ASYNC,
            delete_local_checkpoint_after_upload=True,
            checkpoint_upload_fn=self._upload,
        )

    def _upload(self, checkpoint: Any, name: str) -> Any:
        """Copy a checkpoint folder to the run's storage, riding out a storage outage of up to
        `fs.RETRY_DEADLINE_S` (Ray Train's own upload gives up after 3 quick attempts). Re-copying after a partial
        failure is safe: the destination is new and each file is overwritten whole."""
        import pyarrow.fs

        storage = self._train.get_context().get_storage()
        destination = storage.build_checkpoint_path_from_name(name)
        target = storage.storage_filesystem

        def copy() -> None:
            target.create_dir(destination)
            pyarrow.fs.copy_files(
                checkpoint.path,
                destination,
                source_filesystem=checkpoint.filesystem,
                destination_filesystem=target,
            )

        with_retries(copy, f"upload checkpoint {name}")
        return self._train.Checkpoint(destination, filesystem=target)


def remove_orphaned_checkpoint_folders(root: str | None = None) -> list[Path]:
    """Delete the local checkpoint folders of workers that died before their upload finished; return them.

    Ray Train deletes rank 0's local checkpoint folder after uploading it, but a worker killed in between (a
    SIGKILL, the OOM killer, a fault test) leaves it in the node's temp directory: a whole training state each
    time (~200 MB for ResNet-50), on a node whose workers may be lost and restarted many times in a long sweep.
    Every new worker removes the folders of processes that no longer exist on its machine; a live worker's
    folder (its upload may still be pending) is left alone.
    """
    removed: list[Path] = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{CHECKPOINT_SCRATCH_PREFIX}*"):
        pid = folder.name.removeprefix(CHECKPOINT_SCRATCH_PREFIX).split("-", 1)[0]
        if not folder.is_dir() or not pid.isdigit() or process_exists(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _load_state(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "epoch" not in state:
        raise ValueError(f"{path} is not a training state")
    return state


def _first_readable(candidates: Iterator[tuple[str, Callable[[], dict[str, Any]]]]) -> dict[str, Any] | None:
    """Load the newest checkpoint that reads back; a truncated or corrupt one is skipped with a warning, so a
    crash during a checkpoint write costs one checkpoint interval, not the run."""
    for where, load in candidates:
        try:
            return load()
        except Exception as err:
            print(f"warning: checkpoint {where} is unreadable ({type(err).__name__}: {err}); trying an older one")
    return None


# ------------------------------------------------------------------------------------------------------------
# How the math runs on this worker's device (TrainConfig.performance; docs/precision.md)


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
        _set_fp32_precision(("ieee", "ieee"))


def _fp32_precision() -> tuple[str, str]:
    """(cuDNN convolutions, CUDA matmuls) fp32 precision: "tf32" or "ieee" ("none": torch's default)."""
    return torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision  # type: ignore[attr-defined]


def _set_fp32_precision(value: tuple[str, str]) -> None:
    # The fp32_precision API, never the legacy allow_tf32 flags: torch refuses to read flags set through both.
    torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = value  # type: ignore[attr-defined]


@contextmanager
def _ieee_fp32(device: torch.device) -> Iterator[None]:
    """Evaluation runs in IEEE fp32 on every cell, whatever its training precision (docs/precision.md)."""
    if device.type != "cuda":
        yield
        return
    saved = _fp32_precision()
    _set_fp32_precision(("ieee", "ieee"))
    try:
        yield
    finally:
        _set_fp32_precision(saved)


def compile_model(model: nn.Module) -> nn.Module:
    """`torch.compile(model)` with the project's backend (inductor; tests use a cheaper one)."""
    return torch.compile(model, backend=_COMPILE_BACKEND)  # type: ignore[return-value]


def data_parallel(bare: ResNet, grad_accum_steps: int, compiled: bool = False) -> nn.Module:
    """`bare` wrapped for DDP as `run` wraps it (compiled after wrapping, so DDPOptimizer can split the graph at
    gradient-bucket boundaries and overlap the all-reduce with the backward).

    MBN with clean ratio 0 never uses the clean branch, so DDP must be told some parameters may go unused.
    `static_graph` (gradients bucketed in the order recorded in the first step, no per-step graph search) only
    where it is valid: every parameter used in every step (not MBN), no gradient accumulation (DDP's reducer
    trips an internal assert on `no_sync` + `static_graph` in torch 2.13, pytorch/pytorch#143580), and not under
    torch.compile (DDPOptimizer does not support it, pytorch/pytorch#109261).
    """
    static = not bare.has_mbn and grad_accum_steps == 1 and not compiled
    ddp = nn.parallel.DistributedDataParallel(bare, find_unused_parameters=bare.has_mbn, static_graph=static)
    return compile_model(ddp) if compiled else ddp


def _on_device(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]], execution: Execution
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training batches on the worker's device, in its memory format.

    On a GPU, batch k+1 is copied into pinned memory and sent on a side stream while batch k trains, so the copy
    overlaps compute and never blocks the host; the compute stream waits for it only when it uses the batch.
    On the CPU the batches pass through untouched.
    """
    device = execution.device
    if device.type != "cuda":
        yield from batches
        return
    stream = torch.cuda.Stream(device=device)

    def upload(batch: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        if batch is None:
            return None
        images, labels = batch
        with torch.cuda.stream(stream):
            images = images.pin_memory().to(device, non_blocking=True)
            images = images.contiguous(memory_format=execution.memory_format)
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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: `config` is `TrainConfig.model_dump()`."""
    run(TrainConfig.model_validate(config), RaySession())


def learning_rate(recipe: RecipeConfig, epoch: float) -> float:
    """Linear scaling rule for the base LR; optional linear warm-up; /10 at each decay point (Section 3)."""
    lr = recipe.lr
    if recipe.warmup_epochs and epoch < recipe.warmup_epochs:
        lr *= (epoch + 1e-3) / recipe.warmup_epochs
    return lr * 0.1 ** sum(epoch >= m for m in recipe.lr_milestones())


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _injected_fault(cfg: TrainConfig, epoch: int, rank: int) -> str | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    faults = json.loads(spec)
    for fault in faults if isinstance(faults, list) else [faults]:
        if fault.get("seed") != cfg.seed or fault.get("epoch", 1) != epoch + 1:
            continue
        if fault.get("rank", rank) != rank:
            continue
        once = fault.get("once_file")
        if once:
            try:  # O_EXCL: of several ranks (or attempts) racing for a one-shot fault, exactly one fires it
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
        kind = str(fault["kind"])
        print(f"fault injection: {kind} at epoch {epoch + 1} on rank {rank}", flush=True)
        if kind == "raise":
            raise RuntimeError(f"injected fault at epoch {epoch + 1}")
        if kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        return kind
    return None


def _seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def _micro_batches(cfg: TrainConfig, info: data.DatasetInfo, session: Session, epoch: int) -> Iterator[Any]:
    return data.iter_batches(
        info,
        cfg.data.train_split,
        rank=session.rank,
        world_size=session.world_size,
        batch_size=cfg.recipe.per_worker_batch,
        epoch=epoch,
        seed=cfg.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
    )


def adversarial_loss(
    cfg: TrainConfig,
    model: nn.Module,
    bare: ResNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    generator: torch.Generator,
    *,
    amp_dtype: torch.dtype | None = None,
    attack_forward: nn.Module | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | int]]:
    """Loss of one micro-batch under the cell's strategy, and counts for the train accuracies.

    The batch is [adversarial images; the first round(r * B) clean counterparts] (Section 4.1, clean ratio r),
    and the cross-entropy is averaged over it: at r = 1 this is Eq. 1 with alpha = 0.5. MBN models get the split
    index so each part is normalised by its own BN branch, in one forward that DDP sees once (Section 4.2).

    `amp_dtype` (bf16): the forward passes of the attack and of training run under autocast; the weights stay
    fp32 (the optimizer updates them in fp32), and the loss is taken on fp32 logits. `attack_forward`: what the
    attack differentiates (the compiled model when compiling; None: the model's BN-folded twin). The counts are
    tensors on the device: reading them here would make the host wait for the GPU every micro-batch.
    """
    training = cfg.training
    n = images.shape[0]
    if training.strategy == "standard":
        with autocast(images.device, amp_dtype):
            logits = model(images)
        logits = logits.float() if amp_dtype is not None else logits
        loss = F.cross_entropy(logits, labels)
        return loss, {"clean_correct": (logits.argmax(1) == labels).sum(), "clean_seen": n}

    adv = pgd(
        bare,
        images,
        labels,
        num_classes=num_classes,
        steps=cfg.attack.steps,
        eps=cfg.attack.eps,
        step_size=cfg.attack.resolved_step_size,
        clean_start_prob=cfg.attack.clean_start_prob,
        generator=generator,
        forward=attack_forward,
        amp_dtype=amp_dtype,
    )
    n_clean = round(training.clean_ratio * n)
    batch, targets = adv, labels
    if n_clean:
        batch = torch.cat([adv, images[:n_clean]]).contiguous(memory_format=memory_format_of(images))
        targets = torch.cat([labels, labels[:n_clean]])
    with autocast(images.device, amp_dtype):
        logits = model(batch, split=n)
    logits = logits.float() if amp_dtype is not None else logits
    loss = F.cross_entropy(logits, targets)
    if training.strategy == "alp" and n_clean:
        # ALP (Kannan et al. 2018, Section 4.1 "Adversarial logits pairing"): pull each adversarial image's logits
        # towards its clean counterpart's.
        loss = loss + training.alp_weight * F.mse_loss(logits[:n_clean], logits[n:])
    stats: dict[str, torch.Tensor | int] = {
        "adv_correct": (logits[:n].argmax(1) == labels).sum(),
        "adv_seen": n,
        "clean_correct": (logits[n:].argmax(1) == labels[:n_clean]).sum(),
        "clean_seen": n_clean,
    }
    return loss, stats


def _use_rank0_buffers(bare: nn.Module) -> None:
    """Give every rank rank 0's BN running statistics before evaluating.

    DDP broadcasts rank 0's buffers at the start of each forward, but each rank then updates its own copy on its
    own batch, so after training the ranks hold slightly different statistics. The checkpoint stores rank 0's;
    evaluating with rank 0's on every rank makes the reported numbers those of the saved model.
    """
    if dist.is_available() and dist.is_initialized():
        for buffer in bare.buffers():
            dist.broadcast(buffer, src=0)


def evaluate(cfg: TrainConfig, bare: ResNet, session: Session, num_classes: int) -> dict[str, dict[str, float]]:
    """Clean accuracy and targeted-PGD accuracy for each N in eval.pgd_steps on a fixed subset (Section 3).

    Every cell is attacked identically, whatever the number of workers and whichever other N are evaluated: the
    subset is the first `eval.subset` images of the eval split, each image's target class is drawn once from
    eval.seed, and the random start of eval batch b under PGD-N comes from a generator seeded by (seed, N, b).
    Ranks take whole eval batches round-robin and sum their counts. Each N is a separate attack from a random
    start (never resumed from a weaker one). MBN models are evaluated once per branch (Table 1: MBN_adv and
    MBN_clean).

    Always in IEEE fp32, whatever the cell trained in: a low-precision attack can be weaker, so a bf16 evaluation
    could flatter a bf16-trained model; one fp32 evaluation keeps every cell comparable. The paper's pipeline did
    the same with its fp16 attack ("evaluation during training will still use FP32, for fair comparison").
    """
    with _ieee_fp32(session.device):
        return _evaluate(cfg, bare, session, num_classes)


def _evaluate(cfg: TrainConfig, bare: ResNet, session: Session, num_classes: int) -> dict[str, dict[str, float]]:
    _use_rank0_buffers(bare)
    layout = torch.channels_last if session.device.type == "cuda" else torch.contiguous_format
    images, labels = data.load_split(cfg.data.url, cfg.data.eval_split, cfg.eval.subset)
    targets = random_targets(labels, num_classes, torch.Generator().manual_seed(cfg.eval.seed))
    size = cfg.eval.batch_size
    my_batches = range(session.rank, -(-len(labels) // size), session.world_size)
    branches: list[Literal["adv", "clean"] | None] = ["adv", "clean"] if bare.has_mbn else [None]
    bare.eval()
    results: dict[str, dict[str, float]] = {}
    for branch in branches:
        if branch is not None:
            bare.set_mbn_branch(branch)
        counts = [0.0] * (2 + len(cfg.eval.pgd_steps))  # clean, one per N, images seen
        for b in my_batches:
            part = slice(b * size, (b + 1) * size)
            x, y, t = (v[part].to(session.device) for v in (images, labels, targets))
            x = x.contiguous(memory_format=layout)
            counts[-1] += len(y)
            with torch.no_grad():
                counts[0] += float((bare(x).argmax(1) == y).sum())
            for i, steps in enumerate(cfg.eval.pgd_steps, start=1):
                start = torch.Generator().manual_seed(hash((cfg.eval.seed, steps, b)) % 2**63)
                adv = pgd(
                    bare,
                    x,
                    y,
                    num_classes=num_classes,
                    steps=steps,
                    eps=cfg.eval.eps,
                    step_size=cfg.eval.step_size,
                    targeted=cfg.eval.targeted,
                    targets=t,
                    generator=start,
                )
                with torch.no_grad():
                    counts[i] += float((bare(adv).argmax(1) == y).sum())
        totals = _all_reduce(counts, session.device)
        seen = max(totals[-1], 1.0)
        name = "main" if branch is None else f"mbn_{branch}"
        results[name] = {"acc_clean": totals[0] / seen} | {
            f"acc_pgd_{n}": totals[i] / seen for i, n in enumerate(cfg.eval.pgd_steps, start=1)
        }
    if bare.has_mbn:
        bare.set_mbn_branch("adv")
    return results


def _eval_metrics(cfg: TrainConfig, bare: ResNet, session: Session, num_classes: int) -> dict[str, float]:
    """`evaluate` flattened into report keys `eval/<branch>/<metric>` (the orchestrator parses them back)."""
    results = evaluate(cfg, bare, session, num_classes)
    return {f"eval/{branch}/{key}": value for branch, values in results.items() for key, value in values.items()}


def run(cfg: TrainConfig, session: Session) -> dict[str, Any]:
    """Train one cell from its last checkpoint (or scratch), evaluate it, and return the final metrics."""
    info = data.read_info(cfg.data.url)
    execution = resolve_execution(cfg.performance, session.device)
    configure_backends(execution)
    generator = _seed_everything(cfg.seed * 1009 + session.rank)
    bare = build_model(cfg.model, info.num_classes, in_channels=info.image_shape[0]).to(session.device)
    if execution.channels_last:
        use_channels_last(bare)
    optimizer = torch.optim.SGD(
        bare.parameters(),
        lr=cfg.recipe.lr,
        momentum=cfg.recipe.momentum,
        weight_decay=cfg.recipe.weight_decay,
    )
    start_epoch = 0
    state = session.latest_state()
    if state is not None:
        bare.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["attack_rng"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch = state["epoch"]
    train_seconds = state["train_seconds"] if state is not None else 0.0

    accum = cfg.grad_accum_steps
    # torch.compile (optional): the attack and a single process's training call the same compiled module, in eval
    # and train mode. The attack then runs the compiled model, not the BN-folded twin: compiled code folds eval-mode
    # BN into the surrounding elementwise kernels itself, and compiling a second module would double the compile
    # time. Under DDP, training compiles the DDP wrapper instead (see data_parallel).
    compiled = compile_model(bare) if execution.compile else None
    model: nn.Module = compiled if compiled is not None else bare
    if session.world_size > 1:
        model = data_parallel(bare, accum, compiled=execution.compile)
    micro_per_epoch = data.batches_per_epoch(
        info, cfg.data.train_split, session.world_size, cfg.recipe.per_worker_batch
    )
    steps_per_epoch = micro_per_epoch // accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"recipe.batch_size {cfg.recipe.batch_size} is larger than one epoch of {cfg.data.train_split} data"
        )

    for epoch in range(start_epoch, cfg.recipe.epochs):
        # BN* (Section 4.3, Table 2): running statistics in training for the last K epochs.
        bare.set_bn_star(cfg.model.bn_star_epochs > 0 and epoch >= cfg.recipe.epochs - cfg.model.bn_star_epochs)
        bare.train()
        started = time.perf_counter()
        # Summed on the device and read once per epoch (float64: the same sums as Python floats on the CPU).
        sums = {
            key: torch.zeros((), dtype=torch.float64, device=session.device)
            for key in ("loss", "adv_correct", "adv_seen", "clean_correct", "clean_seen")
        }
        batches = _on_device(_micro_batches(cfg, info, session, epoch), execution)
        poison = 1.0
        for step in range(steps_per_epoch):
            if step == steps_per_epoch // 2 and _injected_fault(cfg, epoch, session.rank) == "nan":
                poison = math.nan
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg.recipe, epoch + step / steps_per_epoch)
            optimizer.zero_grad(set_to_none=True)
            for micro in range(accum):
                images, labels = next(batches)
                # Accumulating micro-batches: only the last backward of a step all-reduces gradients.
                sync = nullcontext() if micro == accum - 1 or session.world_size == 1 else model.no_sync()  # type: ignore[operator]
                with sync:
                    loss, stats = adversarial_loss(
                        cfg,
                        model,
                        bare,
                        images,
                        labels,
                        info.num_classes,
                        generator,
                        amp_dtype=execution.amp_dtype,
                        attack_forward=compiled,
                    )
                    loss = loss * poison
                    (loss / accum).backward()
                sums["loss"] += loss.detach()
                for key, value in stats.items():
                    sums[key] += value
            optimizer.step()
        summed = torch.stack(list(sums.values())).tolist()
        totals = dict(zip(sums, _all_reduce(summed, session.device), strict=True))
        seconds = time.perf_counter() - started
        train_seconds += seconds
        mean_loss = totals["loss"] / (steps_per_epoch * accum * session.world_size)
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"non-finite loss at epoch {epoch + 1}: {mean_loss}")
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": mean_loss,
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_sec": steps_per_epoch * cfg.recipe.batch_size / seconds,
            "epoch_seconds": seconds,
            "train_seconds": train_seconds,
            "start_epoch": start_epoch,  # where this attempt resumed: shows how much an interruption cost
        }
        for kind in ("adv", "clean"):
            if totals[f"{kind}_seen"]:
                metrics[f"train_acc_{kind}"] = totals[f"{kind}_correct"] / totals[f"{kind}_seen"]
        last = epoch + 1 == cfg.recipe.epochs
        save = last or (epoch + 1) % cfg.checkpoint_every == 0
        if last:
            metrics |= _eval_metrics(cfg, bare, session, info.num_classes)
        session.report(metrics, _state(bare, optimizer, generator, epoch + 1, train_seconds) if save else None)
    if start_epoch >= cfg.recipe.epochs:
        # Fitting a run whose last checkpoint is the final epoch (Ray Train resumes it from storage; the sweep only
        # does so when result.json was never written): nothing left to train, report the evaluation again.
        final = {"epoch": start_epoch, "train_seconds": train_seconds, "start_epoch": start_epoch}
        session.report(final | _eval_metrics(cfg, bare, session, num_classes=info.num_classes), None)
    return session.history[-1] if isinstance(session, LocalSession) and session.history else {}


def _state(
    bare: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    epoch: int,
    train_seconds: float,
) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "train_seconds": train_seconds,
        "model": bare.state_dict(),
        "optimizer": optimizer.state_dict(),
        "attack_rng": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workloads.train",
        description="Train and evaluate one cell in this process, without Ray.",
    )
    parser.add_argument("config", type=Path, help="a TrainConfig as JSON (e.g. a cell's config.json)")
    parser.add_argument("--out", type=Path, default=Path("runs/single"), help="checkpoints and metrics.jsonl")
    args = parser.parse_args(argv)
    try:
        cfg = TrainConfig.model_validate_json(args.config.read_text())
    except ValidationError as err:
        # One line: pydantic's own text spends three lines on each error.
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in err.errors())
        print(f"error: {args.config}: {' '.join(problems.split())}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {args.config}: {err}", file=sys.stderr)
        return 2
    session = LocalSession(args.out, use_gpu=cfg.use_gpu)
    final = run(cfg, session)
    for line in session.history:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in line.items()}))
    print(f"finished {cfg.recipe.epochs} epochs; checkpoints and metrics in {os.fspath(args.out)}")
    return 0 if final else 1


if __name__ == "__main__":
    raise SystemExit(main())
