"""Robustness cost of bf16 training on digits: the smoke sweep's cell trained in fp32 and in bf16, several seeds.

`python -m benchmarks.bf16_robustness [--seeds 0 1 2] [--threads 1] [--write]`

The cell is the one `orchestrator.grid` resolves from `sweeps/smoke.yaml` for its default axes (ResNet-18 at
width 1/8 with the small stem, digits at 32x32, PGD-1 mixture training at clean ratio 0, 6 epochs, batch 32, lr
0.2), with `grid` replaced by the seeds and `workload.performance.precision` set to fp32 or bf16. Each run is
`workloads.train.run` in this process (no Ray), one after the other, with one torch thread. bf16 on the CPU is
`torch.autocast("cpu", dtype=torch.bfloat16)`: the same autocast path a GPU takes, with the CPU's bf16 kernels.
Evaluation is always fp32 (workloads.train.evaluate): clean accuracy and targeted PGD-5/PGD-20 accuracy (eps 16,
step 1, random start) on the whole digits test split instead of the smoke's first 200 images, for less noise.

The same seed gives both precisions the same initial weights, data order and attack draws, so the difference is
taken per seed (paired) as well as between the means. `--write` replaces the results block of docs/precision.md.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks._common import DEFAULT_THREADS, Check, format_table, machine_info, markdown_table, print_checks

NAME = "bf16_robustness"
ROOT = Path(__file__).resolve().parent.parent
SWEEP = ROOT / "sweeps" / "smoke.yaml"
DOC = ROOT / "docs" / "precision.md"
PRECISIONS = ("fp32", "bf16")
METRICS = ("acc_clean", "acc_pgd_5", "acc_pgd_20")
# The fp16 attack of the paper's training pipeline cost "about 3%" robustness (ImageNet-Adversarial-Training,
# INSTRUCTIONS.md, `--use-fp16xla`): bf16 passes if its mean PGD-20 accuracy is within that of fp32.
GOAL_DROP = 0.03
BEGIN, END = "<!-- bf16_robustness:begin -->", "<!-- bf16_robustness:end -->"


def cell_configs(seeds: list[int], data_url: str) -> dict[str, list[Any]]:
    """The smoke sweep's default cell per (precision, seed), resolved by orchestrator.grid like a sweep's cells."""
    from orchestrator.grid import expand
    from orchestrator.spec import parse_spec
    from workloads.config import TrainConfig

    spec = yaml.safe_load(SWEEP.read_text())
    configs: dict[str, list[TrainConfig]] = {}
    for precision in PRECISIONS:
        spec["grid"] = [{"seed": seeds}]
        spec["workload"]["performance"] = {"precision": precision}
        spec["workload"]["eval"] = {**spec["workload"]["eval"], "subset": 100_000}  # the whole test split
        cells = expand(parse_spec(yaml.safe_dump(spec), source=f"{SWEEP.name} ({precision})"))
        configs[precision] = []
        for cell in cells:
            config = cell.config.model_dump()
            config["data"]["url"] = data_url  # builtin://digits, converted here as the sweep driver converts it
            configs[precision].append(TrainConfig.model_validate(config))
    return configs


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run(seeds: tuple[int, ...] = (0, 1, 2), threads: int = DEFAULT_THREADS, out: Path | None = None) -> dict[str, Any]:
    import torch

    from workloads import data
    from workloads.sessions import LocalSession
    from workloads.train import run as train_cell

    torch.set_num_threads(threads)
    work = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="bf16-robustness-"))
    data_url = str(work / "digits")
    try:
        data.read_info(data_url)
    except FileNotFoundError:
        data.digits_to_parquet(data_url)
    configs = cell_configs(list(seeds), data_url)
    eval_images = min(configs["fp32"][0].eval.subset, data.read_info(data_url).split("test").num_images)
    runs: dict[str, list[dict[str, float]]] = {p: [] for p in PRECISIONS}
    for seed_index, seed in enumerate(seeds):
        for precision in PRECISIONS:  # alternate, so a change in machine load hits both precisions alike
            cfg = configs[precision][seed_index]
            assert cfg.seed == seed
            started = time.perf_counter()
            final = train_cell(cfg, LocalSession(work / f"{precision}-seed{seed}"))
            row = {m: float(final[f"eval/main/{m}"]) for m in METRICS}
            row |= {"seed": seed, "train_seconds": float(final["train_seconds"]), "loss": float(final["loss"])}
            row["wall_seconds"] = time.perf_counter() - started
            runs[precision].append(row)
            print(
                f"{precision} seed {seed}: clean {row['acc_clean']:.3f}, PGD-5 {row['acc_pgd_5']:.3f}, "
                f"PGD-20 {row['acc_pgd_20']:.3f} ({row['train_seconds']:.0f} s training)",
                flush=True,
            )

    summary = {p: {m: _mean_sd([r[m] for r in runs[p]]) for m in (*METRICS, "train_seconds")} for p in PRECISIONS}
    paired = {m: _mean_sd([b[m] - a[m] for a, b in zip(runs["fp32"], runs["bf16"], strict=True)]) for m in METRICS}
    drop = paired["acc_pgd_20"][0]
    checks = [
        Check(
            NAME,
            f"bf16 - fp32 PGD-20 accuracy on digits, paired over {len(seeds)} seeds",
            f"{drop:+.3f} (sd {paired['acc_pgd_20'][1]:.3f})",
            f">= -{GOAL_DROP:.2f} (the fp16 attack's cost in the paper's pipeline)",
            drop >= -GOAL_DROP,
        ),
        Check(
            NAME,
            "bf16 - fp32 clean accuracy on digits, paired",
            f"{paired['acc_clean'][0]:+.3f} (sd {paired['acc_clean'][1]:.3f})",
            "",
            None,
        ),
    ]
    first = configs["fp32"][0]
    return {
        "name": NAME,
        "setup": {
            "sweep": str(SWEEP.relative_to(ROOT)),
            "model": first.model.model_dump(),
            "attack": first.attack.model_dump(),
            "training": first.training.model_dump(),
            "recipe": {k: first.recipe.model_dump()[k] for k in ("epochs", "batch_size", "per_worker_batch")}
            | {"lr": first.recipe.lr},
            "eval": first.eval.model_dump(),
            "seeds": list(seeds),
            "eval_images": eval_images,
            "torch_threads": threads,
            "machine": machine_info(threads),
        },
        "runs": runs,
        "summary": summary,
        "paired_difference": paired,
        "checks": checks,
    }


def _pm(value: tuple[float, float], digits: int = 3) -> str:
    return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"


def results_markdown(result: dict[str, Any]) -> str:
    s = result["setup"]
    summary, paired = result["summary"], result["paired_difference"]
    rows = [[p, *(_pm(summary[p][m]) for m in METRICS)] for p in PRECISIONS]
    rows.append(["bf16 − fp32 (paired by seed)", *(f"{paired[m][0]:+.3f} ± {paired[m][1]:.3f}" for m in METRICS)])
    n = s["eval_images"]
    pgd20 = summary["fp32"]["acc_pgd_20"][0]
    noise = (pgd20 * (1 - pgd20) / n) ** 0.5
    per_seed = [
        [p, r["seed"], *(f"{r[m]:.3f}" for m in METRICS), f"{r['loss']:.3f}"]
        for p in PRECISIONS
        for r in result["runs"][p]
    ]
    machine = s["machine"]
    return "\n\n".join(
        [
            f"Measured with `python -m benchmarks.bf16_robustness --write` ({len(s['seeds'])} seeds, mean ± sample "
            f"standard deviation; {machine['cpu_model']}, {s['torch_threads']} torch thread, "
            f"torch {machine['torch']}). Accuracies on the {n} test images; at {pgd20:.2f} one evaluation's binomial "
            f"standard error alone is {noise:.3f}. Training times are not compared: the CPU here is shared.",
            markdown_table(["precision", "clean", "PGD-5", "PGD-20"], rows),
            "Per run:",
            markdown_table(["precision", "seed", "clean", "PGD-5", "PGD-20", "final train loss"], per_seed),
        ]
    )


def details_markdown(result: dict[str, Any]) -> str:
    """The benchmark's section of docs/benchmarks.md, should run_all ever run it (it takes ~10 CPU-minutes)."""
    return results_markdown(result) + "\n\nMethod and reading: docs/precision.md."


def write_doc(result: dict[str, Any], doc: Path = DOC) -> None:
    text = doc.read_text()
    block = f"{BEGIN}\n{results_markdown(result)}\n{END}"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{doc} has no {BEGIN} ... {END} block to replace")
    doc.write_text(pattern.sub(lambda _: block, text))


def print_result(result: dict[str, Any]) -> None:
    summary, paired = result["summary"], result["paired_difference"]
    rows = [[p, *(_pm(summary[p][m]) for m in METRICS)] for p in PRECISIONS]
    rows.append(["bf16 - fp32 (paired)", *(f"{paired[m][0]:+.3f} ± {paired[m][1]:.3f}" for m in METRICS)])
    print(format_table(["precision", "clean", "PGD-5", "PGD-20"], rows))
    print_checks(NAME, result["checks"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--out", type=Path, default=None, help="checkpoints and metrics (default: a temp folder)")
    parser.add_argument("--write", action="store_true", help=f"replace the results block of {DOC.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    result = run(tuple(args.seeds), args.threads, args.out)
    print_result(result)
    if args.write:
        write_doc(result)
        print(f"wrote {DOC.relative_to(ROOT)}")
    return result


if __name__ == "__main__":
    main()
