"""Adversarial-training throughput per GPU and model FLOPs utilisation: ResNet-50/152, PGD-10/30, fp32 vs bf16.

`python -m benchmarks.gpu_throughput [--depths 50 152] [--pgd 10 30] [--batches 32 64]
[--modes fp32 bf16 bf16+compile bf16+graph bf16+compile+graph] [--steps 10] [--warmup 3] [--peak-tflops T]`

Runs only where CUDA is available; on a machine without a GPU it says so and exits 0.

What is timed is one training step exactly as `workloads.train.run` takes it on one GPU, through the same code:
the model the product builds (`workloads.models.build_model`, ImageNet stem, 3x224x224, 1000 classes), placed
as `run` places it (channels-last, cuDNN benchmark, `workloads.train.Models`: compiled graphs and the graphed
attack when asked), then per step `adversarial_loss` (targeted PGD-N from a random start on the BN-folded twin,
then the training forward of the adversarial batch at clean ratio 0, the paper's default), backward and the SGD
step. The batch is synthetic and already on the GPU, so the input pipeline is not part of it. Modes: `fp32` (IEEE
fp32: TF32 off, the reference), `bf16` (autocast, `precision: bf16`: the eager baseline of the other modes),
`bf16+compile` (plus `compile: true`, inductor: the attack's graph on the folded twin apart from training's),
`bf16+graph` (plus `graph_attack: true`: the whole attack one CUDA graph, eager kernels) and `bf16+compile+graph`
(both). Each row says how often each graph compiled in its first steps and whether any compiled again while
timed (a recompilation per step would show there), and its speed against `bf16` of the same model, N and batch.

Model FLOPs utilisation (MFU): useful model FLOPs per second over the GPU's dense peak. Useful FLOPs per image
and step follow the cost model of `orchestrator.plan`: 2 x MACs (`resnet_macs`) x (2N + 3) forward-equivalents,
a PGD iteration (forward + input-gradient backward) counting 2 and the training forward + backward 3. MFU is
against the peak of the mode's arithmetic (fp32 modes: the plain fp32 rate; bf16 modes: bf16 tensor cores),
and also against the bf16 peak for every mode, so rows compare on one scale. Peaks are dense (no sparsity),
from NVIDIA's data sheets, looked up by the GPU's name; `--peak-tflops` gives the bf16 peak of any other GPU.
Every row carries the GPU's name.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks._common import Check, format_table, machine_info, markdown_table, print_checks
from workloads.config import (
    AttackConfig,
    DataConfig,
    ModelConfig,
    PerformanceConfig,
    RecipeConfig,
    TrainConfig,
    TrainingConfig,
)

NAME = "gpu_throughput"
NUM_CLASSES = 1000
IMAGE_SIZE = 224
DEPTHS = (50, 152)
PGD_STEPS = (10, 30)
BATCHES = (32, 64)
DEVICE = "cuda"  # a dry run of the code path on the CPU patches this (the timing calls stay CUDA's)
MODES: dict[str, PerformanceConfig] = {
    "fp32": PerformanceConfig(precision="fp32"),
    "bf16": PerformanceConfig(precision="bf16"),
    "bf16+compile": PerformanceConfig(precision="bf16", compile=True),
    "bf16+graph": PerformanceConfig(precision="bf16", graph_attack=True),
    "bf16+compile+graph": PerformanceConfig(precision="bf16", compile=True, graph_attack=True),
}
EAGER = "bf16"  # what the compiled and graphed modes are compared with (`vs_eager`)
# What each mode's speed-up is stated against in the summary.
BASELINE = {"bf16": "fp32", "bf16+compile": EAGER, "bf16+graph": EAGER, "bf16+compile+graph": EAGER}


@dataclass(frozen=True)
class Peak:
    """Dense peak TFLOPS of one GPU model: bf16 tensor cores (V100: fp16, it has no bf16) and plain fp32."""

    label: str
    bf16: float
    fp32: float


# First match wins: more specific names first (H100 PCIe before H100, A100 before A10, L40S before L4).
PEAKS: tuple[tuple[tuple[str, ...], Peak], ...] = (
    (("H100", "PCIE"), Peak("H100 PCIe", 756.0, 51.2)),
    (("H100", "NVL"), Peak("H100 NVL", 835.0, 60.0)),
    (("H100",), Peak("H100 SXM", 989.0, 66.9)),
    (("H200", "NVL"), Peak("H200 NVL", 835.0, 60.0)),
    (("H200",), Peak("H200 SXM", 989.0, 66.9)),
    (("A100",), Peak("A100", 312.0, 19.5)),
    (("V100", "PCIE"), Peak("V100 PCIe (fp16 tensor cores)", 112.0, 14.0)),
    (("V100",), Peak("V100 SXM2 (fp16 tensor cores)", 125.0, 15.7)),
    (("L40S",), Peak("L40S", 362.0, 91.6)),
    (("L4",), Peak("L4", 121.0, 30.3)),
    (("A10",), Peak("A10", 125.0, 31.2)),
)


def peak_for(gpu_name: str, override_bf16: float | None = None) -> Peak | None:
    """The dense peaks of `gpu_name` (as torch.cuda.get_device_name reports it), or None if unknown."""
    name = gpu_name.upper()
    for words, peak in PEAKS:
        if all(w in name for w in words):
            return Peak(peak.label, override_bf16, peak.fp32) if override_bf16 else peak
    return Peak(f"{gpu_name} (given)", override_bf16, float("nan")) if override_bf16 else None


def config(depth: int, pgd_steps: int, batch: int, mode: str) -> TrainConfig:
    """One cell's config at the paper's settings (Section 3): eps 16, step from N, clean ratio 0."""
    return TrainConfig(
        data=DataConfig(url="memory://unused"),  # the benchmark never reads data
        model=ModelConfig(depth=depth, norm="bn", stem="imagenet"),
        attack=AttackConfig(steps=pgd_steps),
        training=TrainingConfig(strategy="mixture", clean_ratio=0.0),
        recipe=RecipeConfig(batch_size=batch, per_worker_batch=batch),
        performance=MODES[mode],
        use_gpu=True,
    )


def model_flops_per_image(cfg: TrainConfig) -> float:
    """2 x MACs x forward-equivalents of one training image (orchestrator.plan's (2N + 3) rule at clean ratio 0)."""
    from orchestrator.plan import resnet_macs, train_forwards_per_image

    macs = resnet_macs(cfg.model.depth, cfg.model.width, cfg.model.stem, IMAGE_SIZE, 3, NUM_CLASSES)
    return 2.0 * macs * train_forwards_per_image(cfg)


def _measure_group(
    depth: int, batch: int, mode: str, pgd: tuple[int, ...], steps: int, warmup: int
) -> list[dict[str, Any]]:
    """Time every PGD-N in `pgd` for one (depth, batch, mode): one model, one compilation of each graph (the
    attack's N only changes how often the attack's graph is called; the graphed attack captures one CUDA graph
    per N)."""
    import torch
    import torch._dynamo

    from workloads import execution as exe
    from workloads import train
    from workloads.models import build_model, use_channels_last

    device = torch.device(DEVICE)
    saved = exe.fp32_precision()
    rows: list[dict[str, Any]] = []
    try:
        base = config(depth, pgd[0], batch, mode)
        execution = exe.resolve_execution(base.performance, device)
        exe.configure_backends(execution)
        torch.manual_seed(0)
        torch._dynamo.reset()
        exe.reset_compile_counts()
        bare = build_model(base.model, NUM_CLASSES, in_channels=3).to(device)
        if execution.channels_last:
            use_channels_last(bare)
        models = train.Models.around(bare, execution, world_size=1, grad_accum_steps=1)
        optimizer = torch.optim.SGD(
            bare.parameters(), lr=base.recipe.lr, momentum=base.recipe.momentum, weight_decay=base.recipe.weight_decay
        )
        images = torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
        images = images.contiguous(memory_format=execution.memory_format)
        labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
        generator = torch.Generator().manual_seed(0)
        for n in pgd:
            cfg = config(depth, n, batch, mode)

            def step(cfg: TrainConfig = cfg) -> None:
                optimizer.zero_grad(set_to_none=True)
                loss, _ = train.adversarial_loss(
                    cfg,
                    models.trained,
                    models.attacked(),
                    images,
                    labels,
                    NUM_CLASSES,
                    generator,
                    amp_dtype=execution.amp_dtype,
                )
                loss.backward()
                optimizer.step()

            rows.append(_time(cfg, mode, step, steps, warmup))
    except torch.cuda.OutOfMemoryError as err:
        done = {r["pgd_steps"] for r in rows}
        rows += [
            {**_row_key(depth, n, batch, mode), "error": f"out of memory: {err}"[:200]} for n in pgd if n not in done
        ]
    finally:
        exe.set_fp32_precision(saved)
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def _row_key(depth: int, n: int, batch: int, mode: str) -> dict[str, Any]:
    import torch

    return {"gpu": torch.cuda.get_device_name(), "depth": depth, "pgd_steps": n, "batch": batch, "mode": mode}


def _time(cfg: TrainConfig, mode: str, step: Callable[[], None], steps: int, warmup: int) -> dict[str, Any]:
    import torch

    from workloads.execution import compile_counts

    before = compile_counts()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    step()  # the first step pays for compilation and cuDNN's algorithm search
    torch.cuda.synchronize()
    first_step = time.perf_counter() - started
    for _ in range(max(0, warmup - 1)):
        step()
    warm = compile_counts()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    timed = compile_counts()
    seconds = begin.elapsed_time(end) / 1000 / steps
    images_per_second = cfg.recipe.per_worker_batch / seconds
    return {
        **_row_key(cfg.model.depth, cfg.attack.steps, cfg.recipe.per_worker_batch, mode),
        "seconds_per_step": seconds,
        "images_per_second": images_per_second,
        "model_tflops_per_second": images_per_second * model_flops_per_image(cfg) / 1e12,
        "first_step_seconds": first_step,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "compiles": count_changes(before, warm),
        "recompiles_timed": sum(count_changes(warm, timed).values()),
    }


def count_changes(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Per count of `workloads.execution.compile_counts`, how much it grew between two readings."""
    return {key: value - before.get(key, 0) for key, value in after.items()}


def with_vs_eager(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rows`, each with `vs_eager`: its images/s over the `bf16` (eager) row of the same model, N and batch
    (None where that row is missing or failed)."""
    eager = {
        (r["depth"], r["pgd_steps"], r["batch"]): r["images_per_second"]
        for r in rows
        if r["mode"] == EAGER and "error" not in r
    }
    out = []
    for r in rows:
        base = eager.get((r["depth"], r["pgd_steps"], r["batch"]))
        out.append(r | {"vs_eager": r["images_per_second"] / base if base and "error" not in r else None})
    return out


def _with_mfu(row: dict[str, Any], peak: Peak | None) -> dict[str, Any]:
    if "error" in row or peak is None:
        return row | {"mfu": None, "mfu_vs_bf16_peak": None}
    own = peak.fp32 if row["mode"] == "fp32" else peak.bf16
    return row | {
        "mfu": row["model_tflops_per_second"] / own,
        "mfu_vs_bf16_peak": row["model_tflops_per_second"] / peak.bf16,
    }


def run(
    depths: tuple[int, ...] = DEPTHS,
    pgd: tuple[int, ...] = PGD_STEPS,
    batches: tuple[int, ...] = BATCHES,
    modes: tuple[str, ...] = tuple(MODES),
    steps: int = 10,
    warmup: int = 3,
    peak_tflops: float | None = None,
) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        message = "no CUDA GPU on this machine: nothing to measure"
        return {
            "name": NAME,
            "skipped": message,
            "setup": {"machine": machine_info()},
            "rows": [],
            "checks": [Check(NAME, "GPU throughput", f"skipped ({message})", "", None)],
        }
    gpu = torch.cuda.get_device_name()
    peak = peak_for(gpu, peak_tflops)
    rows: list[dict[str, Any]] = []
    for depth in depths:
        for batch in batches:
            for mode in modes:
                for row in _measure_group(depth, batch, mode, pgd, steps, warmup):
                    rows.append(_with_mfu(row, peak))
                    _print_row(rows[-1])
    rows = with_vs_eager(rows)
    by_key = {(r["depth"], r["pgd_steps"], r["batch"], r["mode"]): r for r in rows if "error" not in r}
    checks = []
    for depth in depths:
        for n in pgd:
            for batch in batches:
                base = by_key.get((depth, n, batch, "fp32"))
                for mode in modes:
                    found = by_key.get((depth, n, batch, mode))
                    if found is None:
                        continue
                    speedup = f", {found['images_per_second'] / base['images_per_second']:.2f}x fp32" if base else ""
                    if found["vs_eager"] is not None and mode != EAGER:
                        speedup += f", {found['vs_eager']:.2f}x {EAGER}"
                    mfu = f", MFU {found['mfu']:.1%}" if found["mfu"] is not None else ""
                    if found["compiles"].get("dynamo_graphs") or found["recompiles_timed"]:
                        mfu += f", compiled {_compiles(found)}"
                    checks.append(
                        Check(
                            NAME,
                            f"{gpu}: ResNet-{depth} PGD-{n} batch {batch} {mode}",
                            f"{found['images_per_second']:.0f} img/s{mfu}{speedup}",
                            "",
                            None,
                        )
                    )
    capability = torch.cuda.get_device_capability()
    return {
        "name": NAME,
        "setup": {
            "gpu": gpu,
            "compute_capability": f"{capability[0]}.{capability[1]}",
            "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "peak": None if peak is None else {"label": peak.label, "bf16_tflops": peak.bf16, "fp32_tflops": peak.fp32},
            "image_shape": [3, IMAGE_SIZE, IMAGE_SIZE],
            "num_classes": NUM_CLASSES,
            "steps": steps,
            "warmup": warmup,
            "machine": machine_info(),
        },
        "rows": rows,
        "checks": checks,
    }


def _print_row(row: dict[str, Any]) -> None:
    what = f"[{row['gpu']}] ResNet-{row['depth']} PGD-{row['pgd_steps']} batch {row['batch']} {row['mode']}"
    if "error" in row:
        print(f"{what}: {row['error']}", flush=True)
        return
    mfu = f", MFU {row['mfu']:.1%}" if row["mfu"] is not None else ""
    print(f"{what}: {row['images_per_second']:.1f} img/s{mfu}, compilations: {_compiles(row)}", flush=True)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _compiles(row: dict[str, Any]) -> str:
    """How often each graph compiled in the row's first steps, and while timed ("-": a row measured before the
    counts existed)."""
    counts = row.get("compiles")
    if counts is None:
        return "-"
    first = ", ".join(
        f"{k.removesuffix('_graphs')} {v}" for k, v in counts.items() if k in ("attack_graphs", "train_graphs") and v
    )
    return f"{first or 'none'}; timed +{row.get('recompiles_timed', 0)}"


def details_markdown(result: dict[str, Any]) -> str:
    """The benchmark's section of docs/benchmarks.md (for run_all's DETAILS)."""
    if "skipped" in result:
        return f"Skipped: {result['skipped']}. Run it on a GPU machine: `.venv/bin/python -m benchmarks.{NAME}`."
    s = result["setup"]
    peak = s["peak"]
    peaks = (
        f"dense peaks used for MFU ({peak['label']}): bf16 {peak['bf16_tflops']:g} TFLOPS, "
        f"fp32 {peak['fp32_tflops']:g} TFLOPS"
        if peak
        else "peak unknown for this GPU (pass `--peak-tflops`), so no MFU"
    )
    rows = [
        [r["gpu"], f"ResNet-{r['depth']}", r["pgd_steps"], r["batch"], r["mode"], r["error"], "", "", "", "", "", ""]
        if "error" in r
        else [
            r["gpu"],
            f"ResNet-{r['depth']}",
            r["pgd_steps"],
            r["batch"],
            r["mode"],
            f"{r['images_per_second']:.1f}",
            f"{r['model_tflops_per_second']:.1f}",
            _pct(r["mfu"]),
            _pct(r["mfu_vs_bf16_peak"]),
            _ratio(r.get("vs_eager")),
            _compiles(r),
            f"{r['peak_memory_gib']:.1f}",
        ]
        for r in result["rows"]
    ]
    return "\n\n".join(
        [
            f"GPU: {s['gpu']} (compute capability {s['compute_capability']}, {s['gpu_memory_gib']:.0f} GiB), CUDA "
            f"{s['cuda']}, cuDNN {s['cudnn']}; {peaks}. One training step as `workloads.train.run` takes it on one "
            "GPU (targeted PGD-N on the BN-folded twin or the compiled model, the adversarial batch's forward and "
            f"backward, SGD), synthetic {'x'.join(map(str, s['image_shape']))} batches already on the GPU, "
            f"{s['steps']} timed steps after {s['warmup']} untimed. Model FLOPs per image: 2 x MACs x (2N + 3) "
            "(orchestrator.plan's cost model); MFU against the mode's own peak and against the bf16 peak; "
            f"speed against `{EAGER}` (eager) of the same model, N and batch; compilations per graph in the first "
            "steps, and how many more while timed.",
            markdown_table(
                [
                    "GPU",
                    "model",
                    "PGD-N",
                    "batch",
                    "mode",
                    "img/s",
                    "model TFLOPS",
                    "MFU",
                    "MFU vs bf16",
                    "vs eager",
                    "compilations",
                    "GiB",
                ],
                rows,
            ),
            _comparisons(result["rows"]),
        ]
    )


def paper_gpu_images_per_second(depth: int, pgd_steps: int) -> float:
    """orchestrator.plan's images/s for one of the paper's GPUs (its cost model, calibrated on the paper's 52 h
    on 128 GPUs for ResNet-152 PGD-30: an estimate, not a measurement)."""
    from orchestrator.plan import HOURS_PER_MAC

    return 2.0 / (HOURS_PER_MAC * 3600 * model_flops_per_image(config(depth, pgd_steps, 32, "fp32")))


def _comparisons(rows: list[dict[str, Any]]) -> str:
    """bf16 and compile against eager fp32 / bf16 of the same model and batch, and each row against the plan's
    estimate of the paper's GPU (what `planning.relative_speed` asks for)."""
    rate = {
        (r["depth"], r["pgd_steps"], r["batch"], r["mode"]): r["images_per_second"] for r in rows if "error" not in r
    }
    parts = []
    for (depth, n, batch, mode), value in rate.items():
        against = BASELINE.get(mode)
        base = rate.get((depth, n, batch, against)) if against else None
        if base:
            parts.append(f"ResNet-{depth} PGD-{n} batch {batch}: {mode} / {against} {value / base:.2f}x")
    speeds = [
        f"ResNet-{d} PGD-{n} batch {b} {m} {v / paper_gpu_images_per_second(d, n):.1f}"
        for (d, n, b, m), v in rate.items()
    ]
    return (
        (f"{'; '.join(parts)}. " if parts else "")
        + "Against orchestrator.plan's estimate of one of the paper's GPUs (`planning.relative_speed` of a cell): "
        + ("; ".join(speeds) + ".")
    )


def print_result(result: dict[str, Any]) -> None:
    if "skipped" in result:
        print(result["skipped"])
        return
    peak = result["setup"]["peak"]
    print(f"GPU: {result['setup']['gpu']}; peaks: {peak if peak else 'unknown (pass --peak-tflops for MFU)'}")

    print(
        format_table(
            [
                "GPU",
                "model",
                "PGD-N",
                "batch",
                "mode",
                "img/s",
                "ms/step",
                "TFLOPS",
                "MFU",
                "MFU vs bf16",
                "vs eager",
                "compilations",
                "GiB",
            ],
            [
                [r["gpu"], f"ResNet-{r['depth']}", r["pgd_steps"], r["batch"], r["mode"], r.get("error", "")]
                if "error" in r
                else [
                    r["gpu"],
                    f"ResNet-{r['depth']}",
                    r["pgd_steps"],
                    r["batch"],
                    r["mode"],
                    f"{r['images_per_second']:.1f}",
                    f"{r['seconds_per_step'] * 1000:.0f}",
                    f"{r['model_tflops_per_second']:.1f}",
                    _pct(r["mfu"]),
                    _pct(r["mfu_vs_bf16_peak"]),
                    _ratio(r.get("vs_eager")),
                    _compiles(r),
                    f"{r['peak_memory_gib']:.1f}",
                ]
                for r in result["rows"]
            ],
        )
    )
    print_checks(NAME, result["checks"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS))
    parser.add_argument("--pgd", type=int, nargs="+", default=list(PGD_STEPS), help="PGD-N of the training attack")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="per-GPU batch sizes")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, cuDNN search)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of a GPU not in the table")
    args = parser.parse_args(argv)
    result = run(
        tuple(args.depths),
        tuple(args.pgd),
        tuple(args.batches),
        tuple(args.modes),
        args.steps,
        args.warmup,
        args.peak_tflops,
    )
    print_result(result)
    return result


if __name__ == "__main__":
    main()
