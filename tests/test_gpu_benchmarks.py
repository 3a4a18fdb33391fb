"""The GPU benchmarks off the GPU: gpu_feed's code path run on the CPU (its CUDA calls, uploads from pinned memory
and synchronisation, are left out there), the one-command runner, and docs/benchmarks.md's GPU sections rendered
from the results saved on a GPU machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_feed, gpu_machine, gpu_throughput, run_all
from benchmarks._common import Check


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the benchmark runs for real")
def test_gpu_feed_runs_its_whole_path_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_feed, "DEVICE", "cpu")
    monkeypatch.setattr(gpu_feed, "PRECISION", "fp32")  # the path, not bf16's numbers (a minute per step on a CPU)
    torch.set_num_threads(1)
    result = gpu_feed.run(images=32, processes=(), depth=18, pgd=1, batch=8, rounds=1, epochs=1)
    assert set(result["per_core"]) == {
        "library loop (1 process, CPU only)",
        "reader -> GPU, 1 decoding process",
        "reader -> GPU, 1 decoding process, pageable batches",
    }
    assert all(
        v["images_per_cpu_second"] > 0 and v["this_process_ms_per_image"] > 0 for v in result["per_core"].values()
    )
    assert {"1", "2"} <= set(result["feed"]) and any(name.startswith("default (") for name in result["feed"])
    training = result["training"]
    assert training["steps_per_epoch"] == 4 and len(training["epochs"]) == 2  # a warm-up epoch, then one timed
    assert training["demand_images_per_second"] > 0 and training["fed_images_per_second"] > 0
    assert 0 <= training["blocked_after_first_batch_fraction"] <= training["blocked_fraction"] < 1
    assert len(result["checks"]) == 5 and all(isinstance(c, Check) for c in result["checks"])
    text = gpu_feed.details_markdown(result)
    assert "Pageable batches" in text and f"{training['fed_vs_demand']:.2f}x the demand" in text


def test_gpu_machine_writes_each_result_with_when_it_was_measured(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine this runs every GPU benchmark")
    assert gpu_machine.main([str(tmp_path)]) == 0
    for name in gpu_machine.STAGES:
        saved = json.loads((tmp_path / f"{name}.json").read_text())
        assert "skipped" in saved and saved["measured_at"].endswith("UTC") and saved["seconds"] >= 0


@pytest.mark.parametrize("name", run_all.GPU_MODULES)
def test_gpu_sections_render_from_the_saved_results(name: str) -> None:
    skipped = {"name": name, "skipped": "no CUDA GPU on this machine", "checks": []}
    saved = run_all.saved_gpu_result(name, skipped)
    assert saved["saved_from"] == f"benchmarks/gpu_results/{name}.json"
    assert saved["checks"] and all(isinstance(c, Check) for c in saved["checks"])
    text = run_all.render({name: saved}, run_all.machine_info(1), run_all.dt.datetime.now(run_all.dt.UTC), {name: 0.0})
    assert f"## {name} ({saved['seconds']:.0f} s)" in text
    assert f"Measured on {saved['setup']['gpu']} on {saved['measured_at']}" in text
    assert all(c.value in text for c in saved["checks"])  # the summary rows
    # A result measured here, or one of another benchmark, is left as it is.
    measured = {"name": name, "checks": []}
    assert run_all.saved_gpu_result(name, measured) is measured
    assert run_all.saved_gpu_result("input_pipeline", skipped) is skipped


def test_gpu_throughput_rows_carry_their_speed_against_eager_and_their_compilations() -> None:
    """The throughput table's pure part: ratios to the eager (bf16) row of the same model, N and batch, and each
    row's compilations (first steps, then while timed), rendered next to rows saved before either existed."""
    assert gpu_throughput.count_changes(
        {"attack_graphs": 1, "train_graphs": 0}, {"attack_graphs": 1, "train_graphs": 2}
    ) == {
        "attack_graphs": 0,
        "train_graphs": 2,
    }
    base = {"gpu": "NVIDIA H200", "depth": 50, "pgd_steps": 10, "seconds_per_step": 0.1, "first_step_seconds": 1.0}
    timing = {"model_tflops_per_second": 50.0, "peak_memory_gib": 3.0, "mfu": 0.05, "mfu_vs_bf16_peak": 0.05}
    compiles = {"attack_graphs": 1, "train_graphs": 1, "dynamo_frames": 2, "dynamo_graphs": 2}
    rows = [
        base | timing | {"batch": 64, "mode": "bf16", "images_per_second": 300.0},
        base
        | timing
        | {"batch": 64, "mode": "bf16+compile", "images_per_second": 450.0, "compiles": compiles}
        | {"recompiles_timed": 0},
        base | timing | {"batch": 32, "mode": "bf16+compile+graph", "images_per_second": 200.0},  # no eager row
        base | {"batch": 64, "mode": "bf16+graph", "error": "out of memory"},
    ]
    rated = gpu_throughput.with_vs_eager(rows)
    assert [r["vs_eager"] for r in rated] == [1.0, 1.5, None, None]
    result = {
        "name": "gpu_throughput",
        "setup": {
            "gpu": "NVIDIA H200",
            "compute_capability": "9.0",
            "gpu_memory_gib": 139.8,
            "cuda": "13.0",
            "cudnn": 91900,
            "peak": None,
            "image_shape": [3, 224, 224],
            "steps": 10,
            "warmup": 3,
        },
        "rows": rated,
    }
    text = gpu_throughput.details_markdown(result)
    assert "| 1.50x | attack 1, train 1; timed +0 |" in text
    assert "bf16+compile / bf16 1.50x" in text
    assert "| out of memory |" in text
    assert set(gpu_throughput.BASELINE) < set(gpu_throughput.MODES)
