"""GPU machine: can its CPUs feed its GPU? The input pipeline's images/s next to the GPU's training demand.

`python -m benchmarks.gpu_feed [--images 2048] [--processes 4 8] [--depth 50] [--pgd 10] [--batch 64]`

Runs only where CUDA is available; elsewhere it says so and exits 0. Everything is measured in one run on one
machine, on JPEGs made from scikit-learn's sample photographs at ImageNet-like sizes (`workloads.imagenet.
sample_tree`, longer side 300-800 px) and converted with `workloads.data.folder_to_parquet` on every core:

- **per-core rate**: the plain one-process library loop (PIL decode, the paper's random crop, bicubic resize to
  224, flip; `benchmarks.input_pipeline`'s baseline) against the reader with one decoding process delivering to
  the GPU, interleaved rounds, images per CPU-second of the whole process tree (goal >= 0.9x);
- **feed rate**: `workloads.data.iter_batches(colour_on_device=True)` -> `workloads.execution.on_device` (pinned
  upload on a side stream, the colour maps applied on the GPU), with 1, 2, 4, ... decoding processes and with the
  default (the machine's cores less one), images per wall-second delivered to the GPU;
- **demand**: a training step of ResNet-`depth`, ImageNet stem, targeted PGD-`pgd`, bf16, batch `batch`, exactly
  as `workloads.train` takes it, on one fixed batch already on the GPU (images per second: what the GPU eats);
- **fed training**: the same model trained by `workloads.train.train_epoch` on the JPEG shards (the reader with
  its default decoding processes), whole epochs after a warm-up epoch: images per second against the demand,
  and the training loop's time blocked in `next()` on the data.

The machine's cores per GPU needed at the measured per-process rate, demand / rate, is what `orchestrator.plan`
reports per cell (`input_cpus_per_worker`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks._common import Check, format_table, machine_info, markdown_table, median, print_checks
from benchmarks.input_pipeline import (
    BATCH,
    GOAL_SCALING,
    GOAL_VS_LOOP,
    _column,
    _library_loop,
    _measure,
    interleaved,
    paired,
)
from benchmarks.input_pipeline import decoding_processes as with_decoding_processes

NAME = "gpu_feed"
CLASSES = 8
DEVICE = "cuda"  # a dry run of the code path on the CPU patches this
# The GPU's precision (gpu_throughput's mode). A dry run on the CPU patches it to fp32: bf16 convolutions on a CPU
# take a minute per step of the ImageNet-stem cell, and the dry run checks the path, not the numbers.
PRECISION = "bf16"


def _synchronize() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _dataset(work: Path, images: int) -> tuple[str, dict[str, float]]:
    from workloads import data, imagenet

    src = imagenet.sample_tree(
        work / "src",
        classes=CLASSES,
        per_class=max(1, images // CLASSES),
        val_per_class=1,
        sizes=(300, 800),
        odd_files=False,
    )
    url = str(work / "ds")
    started = time.perf_counter()
    info = data.folder_to_parquet(src, url, shard_size=256, val_labels=work / "src_val_labels.txt")
    wall = time.perf_counter() - started
    converted = info.split("train").num_images + info.split("val").num_images
    meta = json.loads((Path(url) / "meta.json").read_text())
    return url, {
        "images": info.split("train").num_images,
        "convert_images_per_wall_second": converted / wall,
        "convert_images_per_core_second": converted / meta["conversion"]["cpu_seconds"],
    }


def _to_gpu(url: str, epochs: int, processes: int | None, pinned: bool = True) -> int:
    """Epochs of the reader as a CUDA worker runs it (batches in pinned memory, colour maps left to the GPU),
    through `on_device`; None: the default decoding processes. ``pinned=False``: pageable batches, which
    `on_device` copies into pinned memory itself."""
    import torch

    from workloads import data
    from workloads.config import PerformanceConfig
    from workloads.execution import on_device, resolve_execution

    execution = resolve_execution(PerformanceConfig(precision=PRECISION), torch.device(DEVICE))
    n = 0
    with with_decoding_processes(processes) if processes is not None else contextlib.nullcontext():
        for epoch in range(epochs):
            batches = data.iter_batches(
                url, "train", batch_size=BATCH, epoch=epoch, colour_on_device=True, pinned=pinned and DEVICE == "cuda"
            )
            for images, _ in on_device(batches, execution):
                n += len(images)
    _synchronize()
    return n


def _training(url: str, depth: int, pgd: int, batch: int, epochs: int, synthetic_steps: int) -> dict[str, Any]:
    """Demand (one fixed batch on the GPU) and fed training (train_epoch on the shards), same model and config."""
    import torch

    from benchmarks.gpu_throughput import config
    from workloads import train
    from workloads.config import DataConfig, TrainConfig
    from workloads.sessions import LocalSession

    # gpu_throughput's cell (the paper's settings, in PRECISION), reading the shards and training whole epochs.
    paper = config(depth, pgd, batch, PRECISION).model_dump()
    cfg = TrainConfig.model_validate(
        paper
        | {
            "data": DataConfig(url=url, eval_split="val").model_dump(),
            "recipe": paper["recipe"] | {"epochs": epochs + 1},
        }
    )
    with tempfile.TemporaryDirectory(prefix="gpu-feed-run-") as out:
        run = train.set_up(cfg, LocalSession(Path(out), use_gpu=True))
        images = torch.rand(batch, 3, 224, 224, device=DEVICE).contiguous(memory_format=run.execution.memory_format)
        labels = torch.randint(0, CLASSES, (batch,), device=DEVICE)

        def step() -> None:
            run.optimizer.zero_grad(set_to_none=True)
            loss, _ = train.adversarial_loss(
                cfg,
                run.models.trained,
                run.models.attacked(),
                images,
                labels,
                CLASSES,
                run.generator,
                amp_dtype=run.execution.amp_dtype,
            )
            loss.backward()
            run.optimizer.step()

        for _ in range(3):  # cuDNN's algorithm search
            step()
        _synchronize()
        started = time.perf_counter()
        for _ in range(synthetic_steps):
            step()
        _synchronize()
        demand = synthetic_steps * batch / (time.perf_counter() - started)

        blocked = [0.0, 0.0]  # in all next() calls of the epoch; in its first (shuffle buffer, pipeline start)
        original = train.on_device

        def timed_on_device(*args: Any, **kwargs: Any) -> Iterator[Any]:
            batches = original(*args, **kwargs)
            while True:
                t0 = time.perf_counter()
                try:
                    item = next(batches)
                except StopIteration:
                    return
                waited = time.perf_counter() - t0
                blocked[1] = blocked[1] or waited
                blocked[0] += waited
                yield item

        train.on_device = timed_on_device
        try:
            epochs_seen = []
            for epoch in range(epochs + 1):  # the first epoch starts the decoding processes
                blocked[:] = [0.0, 0.0]
                metrics = train.train_epoch(run, epoch)
                _synchronize()
                epochs_seen.append({**metrics, "blocked_seconds": blocked[0], "first_batch_seconds": blocked[1]})
        finally:
            train.on_device = original
    timed = epochs_seen[1:]
    fed = median([e["images_per_sec"] for e in timed])
    return {
        "depth": depth,
        "pgd_steps": pgd,
        "batch": batch,
        "precision": run.execution.precision,
        "steps_per_epoch": run.steps_per_epoch,
        "demand_images_per_second": demand,
        "fed_images_per_second": fed,
        "fed_vs_demand": fed / demand,
        "blocked_fraction": median([e["blocked_seconds"] / e["epoch_seconds"] for e in timed]),
        "blocked_after_first_batch_fraction": median(
            [(e["blocked_seconds"] - e["first_batch_seconds"]) / e["epoch_seconds"] for e in timed]
        ),
        "first_batch_seconds": median([e["first_batch_seconds"] for e in timed]),
        "epochs": [
            {
                k: e[k]
                for k in ("epoch", "images_per_sec", "epoch_seconds", "blocked_seconds", "first_batch_seconds", "loss")
            }
            for e in epochs_seen
        ],
    }


def run(
    images: int = 2048,
    processes: tuple[int, ...] = (4, 8),
    depth: int = 50,
    pgd: int = 10,
    batch: int = 64,
    rounds: int = 3,
    epochs: int = 2,
) -> dict[str, Any]:
    import torch

    if DEVICE == "cuda" and not torch.cuda.is_available():
        message = "no CUDA GPU on this machine: nothing to feed"
        return {"name": NAME, "skipped": message, "checks": [Check(NAME, "GPU feed", f"skipped ({message})", "", None)]}
    from workloads import data

    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="gpu-feed-") as work:
        url, dataset = _dataset(Path(work), images)
        payloads = [b for shard in data.read_info(url).split("train").shards for b in _column(url, shard.path)]
        print(
            f"{dataset['images']} images, converted at {dataset['convert_images_per_core_second']:.0f} img/core-s",
            flush=True,
        )

        base, one = "library loop (1 process, CPU only)", "reader -> GPU, 1 decoding process"
        pageable = "reader -> GPU, 1 decoding process, pageable batches"
        per_core = interleaved(
            {
                base: lambda: _library_loop(payloads),
                one: partial(_to_gpu, url, 1, 1),
                pageable: partial(_to_gpu, url, 1, 1, pinned=False),
            },
            rounds,
        )
        print(
            format_table(
                ["case", "img/CPU-s"],
                [[k, f"{median([s['images'] / s['cpu'] for s in v]):.0f}"] for k, v in per_core.items()],
            ),
            flush=True,
        )
        scaling = interleaved({f"{p}": partial(_to_gpu, url, 1, p) for p in (1, 2)}, rounds)
        feed = {
            p: {clock: median([s["images"] / s[clock] for s in v]) for clock in ("wall", "cpu")}
            for p, v in scaling.items()
        }
        for p in (*(p for p in processes if p > 2), None):
            name = f"default ({data.decode_processes()})" if p is None else str(p)
            _to_gpu(url, 1, p)  # warm-up: this pool size starts
            sample = _measure(partial(_to_gpu, url, 2, p))
            feed[name] = {"wall": sample["images"] / sample["wall"], "cpu": sample["images"] / sample["cpu"]}
            print(f"feed, {name} decoding processes: {feed[name]['wall']:.0f} img/s", flush=True)
        training = _training(url, depth, pgd, batch, epochs, synthetic_steps=20)
        print(
            f"demand {training['demand_images_per_second']:.0f} img/s, fed {training['fed_images_per_second']:.0f} "
            f"img/s, blocked {training['blocked_fraction']:.1%}",
            flush=True,
        )

    per_process = median([s["images"] / s["wall"] for s in scaling["1"]])
    result: dict[str, Any] = {
        "name": NAME,
        "setup": {
            "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE,
            "cores": cores,
            "rounds": rounds,
            "machine": machine_info(),
            "torch": torch.__version__,
            **dataset,
        },
        "per_core": {
            k: {
                "images_per_cpu_second": median([s["images"] / s["cpu"] for s in v]),
                "images_per_wall_second": median([s["images"] / s["wall"] for s in v]),
                "this_process_ms_per_image": median([1000 * s["own_cpu"] / s["images"] for s in v]),
            }
            for k, v in per_core.items()
        },
        "reader_vs_loop": paired(per_core, one, base, "cpu"),
        "scaling_1_to_2": paired(scaling, "2", "1", "wall"),
        "per_process_images_per_second": per_process,
        "feed": feed,
        "training": training,
        "cores_per_gpu_needed": training["demand_images_per_second"] / per_process,
    }
    gpu = result["setup"]["gpu"]
    best = max(f["wall"] for f in feed.values())
    result["checks"] = [
        Check(
            NAME,
            f"{gpu} machine: reader -> GPU img/CPU-s vs library loop (1 process)",
            f"{result['reader_vs_loop']:.2f}x",
            f">= {GOAL_VS_LOOP}x",
            result["reader_vs_loop"] >= GOAL_VS_LOOP,
        ),
        Check(
            NAME,
            f"{gpu} machine: scaling 1 -> 2 decoding processes (wall)",
            f"{result['scaling_1_to_2']:.2f}x",
            f">= {GOAL_SCALING}x",
            result["scaling_1_to_2"] >= GOAL_SCALING,
        ),
        Check(
            NAME,
            f"{gpu} machine ({cores} cores): images/s delivered to the GPU, best of the process counts",
            f"{best:.0f}",
            "",
            None,
        ),
        Check(
            NAME,
            f"{gpu}: ResNet-{depth} PGD-{pgd} bf16 batch {batch} demand; cores it needs at the per-process rate",
            f"{training['demand_images_per_second']:.0f} img/s; {result['cores_per_gpu_needed']:.1f} cores",
            "",
            None,
        ),
        Check(
            NAME,
            f"{gpu}: training fed from JPEG shards vs the same step on a batch already on the GPU",
            f"{training['fed_vs_demand']:.2f}x (blocked on data {training['blocked_fraction']:.1%}, "
            f"{training['blocked_after_first_batch_fraction']:.1%} after the first batch)",
            ">= 0.95x",
            training["fed_vs_demand"] >= 0.95,
        ),
    ]
    return result


def details_markdown(result: dict[str, Any]) -> str:
    """The benchmark's section of docs/benchmarks.md."""
    if "skipped" in result:
        return f"Skipped: {result['skipped']}. Run it on a GPU machine: `.venv/bin/python -m benchmarks.{NAME}`."
    s, t = result["setup"], result["training"]
    return "\n\n".join(
        [
            f"GPU machine: {s['gpu']}, {s['cores']} cores ({s['machine']['cpu_model']}), torch {s['torch']}. "
            f"{s['images']} train JPEGs (sample photographs, longer side 300-800 px), converted at "
            f"{s['convert_images_per_core_second']:.0f} images per core-second "
            f"({s['convert_images_per_wall_second']:.0f} per wall-second on all cores).",
            markdown_table(
                ["case", "img/CPU-s", "img/wall-s", "this process, CPU ms/img"],
                [
                    [
                        k,
                        f"{v['images_per_cpu_second']:.0f}",
                        f"{v['images_per_wall_second']:.0f}",
                        f"{v['this_process_ms_per_image']:.2f}",
                    ]
                    for k, v in result["per_core"].items()
                ],
            ),
            f"Reader delivering to the GPU against the library loop, per CPU-second: {result['reader_vs_loop']:.2f}x "
            f"(goal >= {GOAL_VS_LOOP}x); 1 -> 2 decoding processes {result['scaling_1_to_2']:.2f}x (goal >= "
            f"{GOAL_SCALING}x). {s['rounds']} interleaved rounds, medians.",
            markdown_table(
                ["decoding processes", "img/s delivered to the GPU", "img/CPU-s"],
                [[k, f"{v['wall']:.0f}", f"{v['cpu']:.0f}"] for k, v in result["feed"].items()],
            ),
            _pinned_sentence(result),
            f"Demand: ResNet-{t['depth']} (ImageNet stem, {CLASSES} classes), targeted PGD-{t['pgd_steps']}, "
            f"{t['precision']}, batch {t['batch']}, one fixed batch on the GPU: {t['demand_images_per_second']:.0f} "
            f"images/s, which {result['cores_per_gpu_needed']:.1f} decoding processes would match at the "
            f"{result['per_process_images_per_second']:.0f} images/s one delivered above (an estimate: the fed run "
            "below uses the default processes). The same training fed from the JPEG shards (`train_epoch`, "
            f"{t['steps_per_epoch']} steps per epoch, median of the epochs after a warm-up epoch): "
            f"{t['fed_images_per_second']:.0f} images/s, {t['fed_vs_demand']:.2f}x the demand; the loop was blocked "
            f"in `next()` on data {t['blocked_fraction']:.1%} of the epoch, "
            f"{t['blocked_after_first_batch_fraction']:.1%} after its first batch (which waited "
            f"{t['first_batch_seconds']:.2f} s: the shuffle buffer fills and the decoding starts; an ImageNet epoch "
            "amortises it).",
        ]
    )


def _pinned_sentence(result: dict[str, Any]) -> str:
    pinned = result["per_core"].get("reader -> GPU, 1 decoding process")
    pageable = result["per_core"].get("reader -> GPU, 1 decoding process, pageable batches")
    if not (pinned and pageable):
        return ""
    return (
        "Pageable batches, as the reader gave them before it copied CUDA workers' batches into pinned memory: "
        "`on_device` then copies each again with `Tensor.pin_memory()`, a copy torch spreads over its "
        f"{result['setup']['machine']['torch_threads']} intra-op threads. The training process then spent "
        f"{pageable['this_process_ms_per_image']:.2f} ms of CPU per image against "
        f"{pinned['this_process_ms_per_image']:.2f} ms, and the reader ran at "
        f"{pageable['images_per_cpu_second']:.0f} images per CPU-second against "
        f"{pinned['images_per_cpu_second']:.0f}; per wall-second, with its one decoding process, it delivered "
        f"{pageable['images_per_wall_second']:.0f} against {pinned['images_per_wall_second']:.0f}."
    )


def print_result(result: dict[str, Any]) -> None:
    if "skipped" in result:
        print(result["skipped"])
        return
    print(details_markdown(result))
    print_checks(NAME, result["checks"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--processes", type=int, nargs="+", default=[4, 8], help="beyond 1 and 2")
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--pgd", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    result = run(args.images, tuple(args.processes), args.depth, args.pgd, args.batch)
    print_result(result)
    return result


if __name__ == "__main__":
    main()
