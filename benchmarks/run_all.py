"""Run every benchmark and rewrite docs/benchmarks.md with the results.

`.venv/bin/python -m benchmarks.run_all [--only NAME ...] [--no-write]`

A benchmark that fails with an exception is reported as an error in the summary; the others still run. The
document is generated: edit this module, not the Markdown. Each result measured is also kept in
`benchmarks/results/NAME.json`; with `--only`, the sections of the benchmarks not re-run are rendered from there,
saying when and at which commit they were measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks import (
    adaptive_replication,
    checkpoint_io,
    data_reader,
    gpu_feed,
    gpu_throughput,
    input_pipeline,
    orchestration_overhead,
    pgd_vs_torchattacks,
    plan_vs_actual,
    planning,
    scheduler_sim,
    step_cost,
)
from benchmarks._common import (
    DEFAULT_THREADS,
    Check,
    checkout_commit,
    format_table,
    load_average,
    load_result,
    machine_info,
    markdown_table,
    save_result,
    verdict,
)

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
# The GPU benchmarks' last results from a GPU machine (`python -m benchmarks.gpu_machine OUT`, OUT/*.json copied
# here): where this machine has no GPU, their sections are rendered from these files instead of "skipped".
GPU_RESULTS = ROOT / "benchmarks" / "gpu_results"
GPU_MODULES = ("gpu_feed", "gpu_throughput")
# This machine's last result of each benchmark, for the sections a `--only` pass does not re-run.
RESULTS = ROOT / "benchmarks" / "results"
COMMAND = ".venv/bin/python -m benchmarks.run_all"
# Cheapest first: a broken environment shows up in seconds, not after the long orchestration runs.
MODULES: dict[str, ModuleType] = {
    "planning": planning,
    "scheduler_sim": scheduler_sim,
    "adaptive_replication": adaptive_replication,
    "step_cost": step_cost,
    "pgd_vs_torchattacks": pgd_vs_torchattacks,
    "checkpoint_io": checkpoint_io,
    "data_reader": data_reader,
    "input_pipeline": input_pipeline,
    "orchestration_overhead": orchestration_overhead,
    "plan_vs_actual": plan_vs_actual,
    # Last: minutes on a GPU; on a machine without CUDA they report "skipped" at once.
    "gpu_feed": gpu_feed,
    "gpu_throughput": gpu_throughput,
}


def _fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def _pgd_details(r: dict[str, Any]) -> str:
    s = r["setup"]
    rows = [
        [
            name,
            _fmt(c["images_per_cpu_second"], 1),
            _fmt(c["images_per_wall_second"], 1),
            _fmt(c["speedup_vs_torchattacks_cpu"], 3),
            _fmt(c["speedup_vs_torchattacks_wall"], 3),
            _fmt(c["robust_accuracy"], 3),
            _fmt(c["target_hit_rate"], 3),
        ]
        for name, c in r["cases"].items()
    ]
    prof = r["op_profile"]
    det = r["deterministic"]
    model_share = prof["ours"]["conv_share"] + prof["ours"]["batch_norm_share"]
    return "\n\n".join(
        [
            f"ResNet-18 (small stem, width 0.25, BN), 10 classes, 3x32x32, eval mode, batch {s['batch']}; targeted "
            f"L-inf PGD, eps {s['eps']}, step {s['step']}, {s['steps']} steps, random start, same targets for both "
            f"(torchattacks `set_mode_targeted_by_label`). {s['repeats']} interleaved rounds after one warm-up, "
            f"{s['torch_threads']} torch thread. Speed-up = torchattacks time / this attack's time, median of "
            "per-round ratios.",
            markdown_table(
                ["attack", "img/CPU-s", "img/wall-s", "speed-up (CPU)", "speed-up (wall)", "robust acc", "target hit"],
                rows,
            ),
            f"Clean accuracy of the attacked batch: {r['clean_accuracy']:.3f}. Without random start (ours "
            f"`clean_start_prob=1`, theirs `random_start=False`): max |adv_ours - adv_torchattacks| = "
            f"{det['max_abs_diff']:.1e}, robust accuracy {det['ours'][0]:.3f} vs {det['torchattacks'][0]:.3f}. "
            f"BN folding changes logits by at most {r['fold_max_logit_error']:.1e}.",
            "One profiled call of each (`torch.profiler`, self CPU time):",
            markdown_table(
                ["attack", "conv", "conv backward", "BN", "BN backward", "conv share", "BN share"],
                [
                    [
                        name,
                        p["conv_calls"],
                        p["conv_backward_calls"],
                        p["batch_norm_calls"],
                        p["batch_norm_backward_calls"],
                        _fmt(p["conv_share"]),
                        _fmt(p["batch_norm_share"]),
                    ]
                    for name, p in prof.items()
                ],
            ),
            f"Both attacks run the same kernels the same number of times, so there is no difference to find: "
            f"convolutions and BN take {model_share:.0%} of our attack's self CPU time, and even a loop around them "
            f"(random start, sign, projection) that cost nothing would be at most 1 / {model_share:.2f} = "
            f"{1 / model_share:.2f}x faster. A 1.2x speed-up has to come from the model's work: the rows marked "
            "*proposal* (not product code) size folding BN into the convolutions for the attack (BN is affine in "
            "eval mode) and channels-last tensors.",
        ]
    )


def _step_details(r: dict[str, Any]) -> str:
    s = r["setup"]
    rows = [
        [
            p["steps"],
            _fmt(p["seconds_per_step_cpu"] * 1000, 0),
            _fmt(p["ratio_cpu"]),
            _fmt(p["ratio_wall"]),
            _fmt(p["bound"]),
            _fmt(p["measured_over_bound"], 3),
            _fmt(p["pgd_iteration_forwards"]),
        ]
        for p in r["pgd"].values()
    ]
    return "\n\n".join(
        [
            f"ResNet-18 (small stem, width 0.25, BN), batch {s['batch']}, 3x32x32; one step = "
            "`workloads.train.adversarial_loss` + backward + SGD step (strategy mixture, clean ratio 0); baseline: "
            f"the same with strategy standard ({r['clean_seconds_per_step_cpu'] * 1000:.0f} ms CPU per step). "
            f"{s['repeats']} interleaved rounds of {s['steps_per_sample']} steps per case, {s['torch_threads']} "
            "torch thread; ratios are medians of per-round ratios.",
            markdown_table(
                [
                    "PGD-N",
                    "ms/step (CPU)",
                    "ratio (CPU)",
                    "ratio (wall)",
                    "bound (2N+3)/3",
                    "measured/bound",
                    "forward-eq. per PGD iteration",
                ],
                rows,
            ),
            "The last column solves ratio = (2N a + 3) / 3 for a: the cost model (`orchestrator.plan`) assumes "
            "a = 2 (forward + input-gradient backward).",
        ]
    )


def _planning_details(r: dict[str, Any]) -> str:
    phases = r["phase_cpu_seconds"]
    return "\n\n".join(
        [
            "A generated paper-scale spec (GPU cluster, ImageNet planning defaults) with a 10 x 5 x 10 x 4 x 5 grid "
            "(clean_ratio x norm x pgd_steps x depth x batch_size = 10,000 distinct cells), parsed (`parse_spec`), "
            "expanded (`expand`) and planned (`plan_spec`) in a fresh interpreter per measurement; a 1,000-cell "
            f"spec is interleaved with it. {r['setup']['repeats']} runs each, medians.",
            markdown_table(
                ["cells", "parse CPU s", "expand CPU s", "plan CPU s", "total CPU s", "total wall s"],
                [
                    ["1,000", "", "", "", _fmt(r["cpu_seconds_1000"]), ""],
                    [
                        "10,000",
                        _fmt(phases["parse"]),
                        _fmt(phases["expand"]),
                        _fmt(phases["plan"]),
                        _fmt(r["cpu_seconds"]),
                        _fmt(r["wall_seconds"]),
                    ],
                ],
            ),
            f"Peak RSS of the process {r['peak_rss_mb']:.0f} MB, of which {r['rss_after_imports_mb']:.0f} MB after "
            f"the imports (interpreter, pydantic, PyYAML); tracemalloc peak of the Python allocations during parse + "
            f"expand + plan {r['traced_peak_mb']:.0f} MB. Imports take {r['import_seconds']:.2f} s (not counted). "
            f"Scaling 1,000 -> 10,000 cells: x{r['scaling_10k_over_1k']:.1f} (10 = linear). Pass/fail uses CPU "
            "seconds: single-threaded Python, so equal to wall seconds on an idle machine, while wall seconds on "
            "this shared machine also measure the other jobs.",
        ]
    )


def _orchestration_details(r: dict[str, Any]) -> str:
    s = r["setup"]
    runs = len(r["sweep_seconds"])
    rows = [
        ["sweep, 1 cell (wall s)", *(_fmt(x, 1) for x in r["sweep_seconds"]), _fmt(r["sweep_median_seconds"], 1)],
        ["single process (wall s)", *(_fmt(x, 1) for x in r["single_seconds"]), _fmt(r["single_median_seconds"], 1)],
        ["sweep, 1 cell (CPU s, tree)", *(_fmt(x, 1) for x in r["sweep_cpu_seconds"]), ""],
        ["single process (CPU s, tree)", *(_fmt(x, 1) for x in r["single_cpu_seconds"]), ""],
    ]
    phases = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in r["sweep_phases_seconds"].items())
    top = ", ".join(f"`{k}` {v:.1f}" for k, v in list(r["sweep_cpu_by_process"].items())[:12])
    parts = [
        f"The cell: `{s['workload_from']}`'s workload as a 1-cell grid, 1 CPU per worker, OMP_NUM_THREADS=1 for "
        "both commands (what Ray gives a 1-CPU worker). Sweep: `python -m orchestrator.sweep SPEC` with a fresh "
        "local Ray in a private temp dir; single: `python -m workloads.train CELL.json --out DIR` with the "
        "`train` section of the sweep's `cells/<id>/config.json` and the data URL resolved to the sweep's "
        "`datasets/digits`. The dataset is converted once and copied into every sweep's storage. "
        f"{runs} sweep/single pairs, order alternating; overhead and ratio are medians of per-pair values.",
        markdown_table(["command", *(f"run {i}" for i in range(runs)), "median"], rows),
        f"Sweep timeline (median seconds from launch): {phases}.",
        f"Sweep CPU seconds by process (last run; names are Linux's 15-character `comm`): {top}.",
        "The difference is the once-per-sweep start-up (a fresh Ray instance and its dashboard, Tune) plus one "
        "cell's own overhead: its Tune trial and the queue it reports through, and Ray Train's controller, "
        "worker group and its synchronisation, dataset and placement-group actors, each a new process that "
        "imports Ray (the process list above). In-loop `train_seconds` Ray / single: "
        f"{r['in_loop_train_ratio']:.2f} (few-second epochs on a shared machine: read as noise unless far from 1).",
    ]
    if "cells" in r:
        parts.append(
            f"{r['cells']} cells in one sweep (seeds 0..{r['cells'] - 1}, run one after another: 2 x 1.01 CPUs do "
            f"not fit in 2): {r['multi_sweep_seconds']:.1f} s wall, {r['multi_sweep_cpu_seconds']:.1f} CPU s. "
            "What one more cell adds beyond its own training: the sweep finishes one cell every "
            f"{r['cycle_seconds']:.1f} s once the first is done (median cycle), {r['marginal_overhead_per_cell']:.1f}"
            " s more than the single-process run; against a 5-min cell that is "
            f"{100 * r['long_cell_fraction']:.1f} %, and it is the part that grows with a study's size. From whole "
            f"runs, (T(N) - T(1)) / (N - 1) - T(single) = {r['marginal_overhead_whole_runs']:.1f} s wall, "
            f"{r['marginal_overhead_per_cell_cpu']:.1f} s in CPU seconds of the process trees; that difference of "
            "two runs also carries the difference of their Ray start-ups. Amortised "
            f"over this sweep, (T(N) - N x T(single)) / N = {r['amortised_overhead_per_cell']:.1f} s per cell. "
            "Each cell starts seven processes that import Ray (Tune's trial and its queue, Ray Train's controller, "
            "its synchronisation, dataset and placement-group actors, and the worker): on 2 cores, their start-up "
            "is most of the cycle's overhead."
        )
    return "\n\n".join(parts)


DETAILS: dict[str, Callable[[dict[str, Any]], str]] = {
    "planning": _planning_details,
    # Newer modules render their own section.
    "scheduler_sim": scheduler_sim.details_markdown,
    "step_cost": _step_details,
    "pgd_vs_torchattacks": _pgd_details,
    "checkpoint_io": checkpoint_io.details_markdown,
    "data_reader": data_reader.details_markdown,
    "input_pipeline": input_pipeline.details_markdown,
    "orchestration_overhead": _orchestration_details,
    "plan_vs_actual": plan_vs_actual.details_markdown,
    "adaptive_replication": adaptive_replication.details_markdown,
    "gpu_feed": gpu_feed.details_markdown,
    "gpu_throughput": gpu_throughput.details_markdown,
}


def saved_gpu_result(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """``result`` of a GPU benchmark, or, where it was skipped for want of a GPU, its saved result if any."""
    path = GPU_RESULTS / f"{name}.json"
    if name not in GPU_MODULES or "skipped" not in result or not path.exists():
        return result
    return load_result(path) | {"saved_from": str(path.relative_to(ROOT)), "saved_on_gpu": True}


def earlier_result(name: str) -> dict[str, Any] | None:
    """This machine's last result of ``name`` (`RESULTS`), for a pass that does not re-run it; None if none."""
    path = RESULTS / f"{name}.json"
    if path.exists():
        return load_result(path) | {"saved_from": str(path.relative_to(ROOT))}
    gpu = saved_gpu_result(name, {"name": name, "skipped": "not re-run", "checks": []})
    return gpu if "saved_from" in gpu else None


def _saved_note(result: dict[str, Any]) -> str:
    commit = f" at commit {result['commit']}" if result.get("commit") else ""
    if result.get("saved_on_gpu"):
        return (
            f"Measured on {result['setup']['gpu']} on {result['measured_at']}{commit} with `python -m "
            f"benchmarks.gpu_machine`; rendered from `{result['saved_from']}`, as this machine has no GPU."
        )
    machine = f" ({result['machine']})" if result.get("machine") else ""
    return (
        f"Not re-run in this pass: measured on {result['measured_at']}{commit}{machine}, rendered from "
        f"`{result['saved_from']}`."
    )


def render(results: dict[str, Any], machine: dict[str, Any], started: dt.datetime, seconds: dict[str, float]) -> str:
    checks: list[Check] = []
    for name, result in results.items():
        if "error" in result:
            checks.append(Check(name, "error", result["error"].splitlines()[-1], "", False))
        else:
            checks.extend(result["checks"])
    summary = markdown_table(
        ["benchmark", "metric", "measured", "goal", "result"],
        [[c.benchmark, c.metric, c.value, c.goal, verdict(c.passed)] for c in checks],
    )
    out = [
        "# Benchmarks",
        f"Generated by `{COMMAND}` (from the repository root) on {started:%Y-%m-%d %H:%M} UTC; "
        "do not edit by hand, re-run the command.",
        markdown_table(
            ["machine", ""],
            [
                ["CPU", machine["cpu_model"]],
                ["cores (logical / usable)", f"{machine['logical_cores']} / {machine['usable_cores']}"],
                ["torch threads", f"{DEFAULT_THREADS} in the compute benchmarks; OMP_NUM_THREADS=1 for commands"],
                ["torch / Python", f"{machine['torch']} / {machine['python']}"],
                ["1-min load average at start / end", f"{machine['load_average_1min']} / {load_average():.2f}"],
            ],
        ),
        "## Summary",
        summary,
        "## Method",
        "The machine is shared (2 cores, other jobs running): absolute times move by whole factors from minute to "
        "minute. So every benchmark compares a baseline and a candidate measured in the same run, interleaved "
        "(the order rotating between rounds), and reports the median of the per-round ratios. Compute benchmarks "
        "run one torch thread and count CPU seconds of the process next to wall seconds: with one thread, CPU time "
        "is the work done whether or not the scheduler gave the core away; with 2 OpenMP threads on oversubscribed "
        "cores both clocks explode (the tiny cell took 112 s at 2 threads against 9.8 s at 1). The orchestration "
        "benchmark is about wall time (Ray start-up is mostly waiting on processes), so it reports wall seconds "
        "with the CPU seconds of the whole process tree beside them. The storage benchmarks (checkpoint_io, "
        "data_reader) run against moto's S3 server on 127.0.0.1, in a child process, and compare our path with a "
        "plain client (or the step with and without the reader) in the same run. The scheduler simulator times "
        "nothing: its numbers are deterministic.",
    ]
    for name, result in results.items():
        took = result["seconds"] if "saved_from" in result else seconds[name]  # saved: as long as it took there
        out.append(f"## {name} ({took:.0f} s)")
        out.append(f"`.venv/bin/python -m benchmarks.{name}`")
        if "saved_from" in result:
            out.append(_saved_note(result))
        if "error" in result:
            out.append("Failed:\n\n```\n" + result["error"].rstrip() + "\n```")
        else:
            out.append(DETAILS[name](result))
    return "\n\n".join(out) + "\n"


def run(only: list[str] | None = None, write: bool = True) -> dict[str, Any]:
    started = dt.datetime.now(dt.UTC)
    machine = machine_info(DEFAULT_THREADS)
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    commit = checkout_commit()
    for name, module in MODULES.items():
        if only and name not in only:
            earlier = earlier_result(name)
            if earlier is not None:
                results[name] = earlier
            continue
        print(f"\n### {name}", flush=True)
        t0 = time.perf_counter()
        measured_at = f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"
        try:
            result = module.run()
            if write and "skipped" not in result:
                kept = result | {
                    "seconds": time.perf_counter() - t0,
                    "measured_at": measured_at,
                    "commit": commit,
                    "machine": machine["cpu_model"],
                }
                save_result(RESULTS / f"{name}.json", kept)
            results[name] = saved_gpu_result(name, result)
            module.print_result(results[name])
        except Exception:
            results[name] = {"name": name, "error": traceback.format_exc()}
            print(results[name]["error"])
        seconds[name] = time.perf_counter() - t0
    if write:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(render(results, machine, started, seconds))
        print(f"\nwrote {DOC.relative_to(ROOT)}")
    checks = [c for r in results.values() for c in r.get("checks", [])]
    print(format_table(["benchmark", "metric", "result"], [[c.benchmark, c.metric, verdict(c.passed)] for c in checks]))
    return {"machine": machine, "results": results, "seconds": seconds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only", nargs="+", choices=list(MODULES), help="run only these (the others' sections: their last results)"
    )
    parser.add_argument("--no-write", action="store_true", help=f"do not rewrite {DOC.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    return run(args.only, write=not args.no_write)


if __name__ == "__main__":
    main()
