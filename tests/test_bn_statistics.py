"""BN statistics of the two domains (Figures 5 and 6) and the domain gap: the statistics against hand computation,
the gap against its formula and its behaviour, the worker's measurement after training (read-only, in result.json
and results.parquet), and the report's figures from a results folder with and without the data."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from orchestrator.grid import expand
from orchestrator.report import build_report
from orchestrator.results import RESULTS_FILE
from orchestrator.runner import bn_statistics_fields
from tests.test_report import DIGITS_WORKLOAD, make_spec, read_text, record, write_sweep
from workloads import bn_statistics, train
from workloads.bn_statistics import Moments, bhattacharyya, domain_gap
from workloads.config import ModelConfig, TrainConfig
from workloads.data import synthetic_to_parquet
from workloads.models import MixedBatchNorm2d, ResNet, build_model
from workloads.sessions import STATE_FILE, LocalSession


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def network(norm: str, width: float = 0.25) -> ResNet:
    """ResNet-18 with the small stem: res3's first BN of the last block has 128 x width channels (32 here)."""
    torch.manual_seed(0)
    return build_model(ModelConfig(depth=18, norm=norm, width=width, stem="small"), num_classes=4, in_channels=1)


# ------------------------------------------------------------------------------------------------------------
# The statistics against hand computation


def test_batch_statistics_are_the_mean_and_unbiased_variance_of_the_layers_input() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU())
    model[1].running_mean.fill_(0.25)
    images = torch.randn(5, 2, 6, 6)
    model.train()
    found = bn_statistics.batch_statistics(model, images, ["1"])
    with torch.no_grad():
        features = model[0](images)  # (5, 3, 4, 4): the BN's input
    for c in range(3):
        values = [float(v) for v in features[:, c].flatten()]
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
        assert float(found["1"].mean[c]) == pytest.approx(mean, rel=1e-5)
        assert float(found["1"].var[c]) == pytest.approx(var, rel=1e-5)
    assert model.training  # the mode is given back
    assert torch.equal(model[1].running_mean, torch.full((3,), 0.25))  # eval mode: running statistics untouched
    assert int(model[1].num_batches_tracked) == 0
    assert not model[1]._forward_pre_hooks  # the hook is removed


def test_running_statistics_of_each_mbn_branch_are_copies_of_its_buffers() -> None:
    layer = MixedBatchNorm2d(4)
    layer.adv.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    layer.adv.running_var.copy_(torch.tensor([5.0, 6.0, 7.0, 8.0]))
    layer.clean.running_mean.copy_(torch.tensor([-1.0, 0.0, 1.0, 2.0]))
    stats = bn_statistics.running_statistics(layer)
    assert set(stats) == {"adv", "clean"}
    assert stats["adv"].mean.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert stats["adv"].var.tolist() == [5.0, 6.0, 7.0, 8.0]
    assert stats["clean"].mean.tolist() == [-1.0, 0.0, 1.0, 2.0]
    assert stats["clean"].var.tolist() == [1.0] * 4  # still the initial variance
    layer.adv.running_mean.zero_()
    assert stats["adv"].mean.tolist() == [1.0, 2.0, 3.0, 4.0]  # a copy, not a view of the live buffer
    assert set(bn_statistics.running_statistics(nn.BatchNorm2d(4))) == {"main"}


def test_the_figure_layer_is_the_first_bn_of_res3s_last_block_and_20_channels_are_sampled() -> None:
    bn, mbn = network("bn"), network("mbn")
    assert bn_statistics.figure_layer(bn) == "layer2.1.bn1"
    assert bn_statistics.figure_layer(mbn) == "layer2.1.bn1"
    assert bn_statistics.figure_layer(network("gn")) is None
    assert bn_statistics.norm_layers(network("gn")) == {}
    deep = build_model(ModelConfig(depth=50, norm="bn", width=0.125, stem="small"), 4, 1)
    assert bn_statistics.figure_layer(deep) == "layer2.3.bn1"  # ResNet-50's res3 has 4 blocks
    channels = bn_statistics.sample_channels(32)
    assert len(channels) == 20 == len(set(channels)) and channels == sorted(channels)
    assert channels == bn_statistics.sample_channels(32)  # the same channels in every cell
    assert channels != list(range(20)) and max(channels) < 32  # sampled, not the first 20
    assert bn_statistics.sample_channels(8) == list(range(8))


# ------------------------------------------------------------------------------------------------------------
# The domain gap


def moments(mean: list[float], var: list[float]) -> Moments:
    return Moments(torch.tensor(mean), torch.tensor(var))


def test_bhattacharyya_distance_against_its_formula() -> None:
    a, b = moments([0.0, 1.0], [1.0, 4.0]), moments([2.0, 1.0], [3.0, 1.0])
    got = bhattacharyya(a, b, eps=0.0).tolist()
    for c in range(2):
        ma, mb, va, vb = float(a.mean[c]), float(b.mean[c]), float(a.var[c]), float(b.var[c])
        want = (ma - mb) ** 2 / (4 * (va + vb)) + 0.5 * math.log((va + vb) / (2 * math.sqrt(va * vb)))
        assert got[c] == pytest.approx(want, rel=1e-12)
    assert got[0] == pytest.approx(4 / 16 + 0.5 * math.log(4 / (2 * math.sqrt(3))))


def test_domain_gap_is_zero_for_identical_statistics_and_grows_with_a_shift_or_a_variance_ratio() -> None:
    torch.manual_seed(2)
    base = [Moments(torch.randn(16), torch.rand(16) + 0.5) for _ in range(3)]
    assert domain_gap((m, m) for m in base) == 0.0
    shifted = [domain_gap((m, Moments(m.mean + shift, m.var)) for m in base) for shift in (0.1, 0.5, 2.0)]
    assert 0 < shifted[0] < shifted[1] < shifted[2]
    scaled = [domain_gap((m, Moments(m.mean, m.var * ratio)) for m in base) for ratio in (1.5, 3.0)]
    assert 0 < scaled[0] < scaled[1]
    assert domain_gap((m, Moments(m.mean, m.var * 3.0)) for m in base) == pytest.approx(
        domain_gap((Moments(m.mean, m.var * 3.0), m) for m in base)
    )  # symmetric
    assert domain_gap([]) is None


def trained_mbn() -> ResNet:
    """An MBN network whose two branches hold the same (non-initial) running statistics and both trained."""
    model = network("mbn")
    torch.manual_seed(3)
    for layer in bn_statistics.norm_layers(model).values():
        assert isinstance(layer, MixedBatchNorm2d)
        layer.adv.running_mean.copy_(torch.randn_like(layer.adv.running_mean))
        layer.adv.running_var.copy_(torch.rand_like(layer.adv.running_var) + 0.5)
        layer.clean.load_state_dict(layer.adv.state_dict())
        layer.adv.num_batches_tracked.fill_(10)
        layer.clean.num_batches_tracked.fill_(10)
    return model


def test_mbn_gap_is_zero_for_identical_branches_grows_with_a_shifted_branch_and_is_none_for_an_untrained_one() -> None:
    model = trained_mbn()
    summary = bn_statistics.mbn_summary(model)
    assert summary is not None
    assert summary["domain_gap"] == 0.0
    assert summary["layers"] == len(bn_statistics.norm_layers(model))
    assert summary["running"]["adv"] == summary["running"]["clean"]
    shown = dict(model.named_modules())[summary["layer"]]
    assert summary["running"]["adv"]["mean"] == pytest.approx(
        shown.adv.running_mean[summary["channels"]].tolist(), rel=1e-5
    )

    gaps = []
    for shift in (0.2, 1.0):
        for layer in bn_statistics.norm_layers(model).values():
            assert isinstance(layer, MixedBatchNorm2d)
            layer.clean.running_mean.copy_(layer.adv.running_mean + shift)
        gaps.append(bn_statistics.mbn_summary(model)["domain_gap"])
    assert 0 < gaps[0] < gaps[1]

    for layer in bn_statistics.norm_layers(model).values():
        layer.clean.num_batches_tracked.zero_()
    assert bn_statistics.mbn_summary(model)["domain_gap"] is None
    assert bn_statistics.mbn_summary(network("bn")) is None


def test_bn_gap_is_zero_for_the_same_batch_and_grows_with_a_perturbation_and_leaves_the_network_as_it_was() -> None:
    model = network("bn")
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(4)
    images = torch.rand(8, 1, 16, 16)
    same = bn_statistics.bn_summary(model, images, images.clone())
    assert same is not None and same["domain_gap"] == 0.0
    assert same["batch"]["clean"] == same["batch"]["adv"]
    gaps = [
        bn_statistics.bn_summary(model, images, (images + eps * torch.randn_like(images)).clamp(0, 1))["domain_gap"]
        for eps in (0.05, 0.3)
    ]
    assert 0 < gaps[0] < gaps[1]
    shown = same["layer"]
    direct = bn_statistics.batch_statistics(model, images, [shown])[shown]
    assert same["batch"]["clean"]["var"] == pytest.approx(direct.var[same["channels"]].tolist(), rel=1e-5)
    assert same["images"] == 8 and len(same["channels"]) == 20
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training
    assert bn_statistics.bn_summary(network("mbn"), images, images) is None


# ------------------------------------------------------------------------------------------------------------
# The worker's measurement after training


@pytest.fixture(scope="module")
def synthetic_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("datasets") / "synthetic")
    synthetic_to_parquet(url, 64, (1, 16, 16), 4, seed=5, num_test=32, shard_size=64)
    return url


def tiny_cell(url: str, norm: str, clean_ratio: float) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "data": {"url": url, "shuffle_buffer": 64},
            "model": {"depth": 18, "width": 0.25, "stem": "small", "norm": norm},
            "attack": {"steps": 2},
            "training": {"strategy": "mixture", "clean_ratio": clean_ratio},
            "recipe": {"epochs": 1, "batch_size": 32, "per_worker_batch": 32},
            "eval": {"pgd_steps": [1], "subset": 24, "batch_size": 12},
        }
    )


def final_state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / "checkpoint_000001" / STATE_FILE, weights_only=False)


@pytest.mark.parametrize(("norm", "clean_ratio"), [("bn", 0.0), ("mbn", 1.0)])
def test_the_last_report_carries_the_statistics_of_the_saved_model_and_training_is_unchanged(
    synthetic_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, norm: str, clean_ratio: float
) -> None:
    cfg = tiny_cell(synthetic_url, norm, clean_ratio)
    final = train.run(cfg, LocalSession(tmp_path / "measured"))
    summary = json.loads(final[bn_statistics.STATISTICS_METRIC])
    assert final[bn_statistics.GAP_METRIC] == summary["domain_gap"] > 0
    assert summary["layer"] == "layer2.1.bn1" and len(summary["channels"]) == 20

    # The same numbers from the saved checkpoint: the measurement describes the model the cell stores.
    state = final_state(tmp_path / "measured")
    model = build_model(cfg.model, 4, 1)
    model.load_state_dict(state["model"])
    if norm == "mbn":
        assert summary == bn_statistics.mbn_summary(model)
    else:
        running = dict(model.named_modules())[summary["layer"]].running_mean[summary["channels"]]
        assert summary["running"]["main"]["mean"] == pytest.approx(running.tolist(), rel=1e-5)
        assert set(summary["batch"]) == {"clean", "adv"} and summary["images"] == 12

    # Without the measurement, training, evaluation and the checkpoint (weights, running statistics, RNG states)
    # are exactly the same.
    monkeypatch.setattr(bn_statistics, "measure", lambda *args: {})
    plain = train.run(cfg, LocalSession(tmp_path / "plain"))
    assert bn_statistics.STATISTICS_METRIC not in plain
    assert {k: v for k, v in final.items() if k not in plain} == {
        k: final[k] for k in (bn_statistics.STATISTICS_METRIC, bn_statistics.GAP_METRIC)
    }
    skip = ("images_per_sec", "epoch_seconds", "train_seconds")
    assert {k: v for k, v in plain.items() if k not in skip} == {k: final[k] for k in plain if k not in skip}
    other = final_state(tmp_path / "plain")
    assert all(torch.equal(state["model"][k], other["model"][k]) for k in state["model"])
    assert torch.equal(state["torch_rng"], other["torch_rng"])
    assert torch.equal(state["attack_rng"], other["attack_rng"])

    # result.json: the gap as a number and the figure data as an object; unreadable data is dropped.
    fields = bn_statistics_fields(final)
    assert fields == {"domain_gap": final["domain_gap"], "bn_statistics": summary}
    assert bn_statistics_fields({"bn_statistics": "{not json", "domain_gap": float("nan")}) == {}
    assert bn_statistics_fields({}) == {}


def test_a_gn_network_measures_nothing(synthetic_url: str, tmp_path: Path) -> None:
    cfg = tiny_cell(synthetic_url, "gn", 0.0)
    assert bn_statistics.measure(cfg, network("gn"), LocalSession(tmp_path), 4) == {}


# ------------------------------------------------------------------------------------------------------------
# The report: Figures 5 and 6 and the gap per setting from a results folder


GRID = [{"clean_ratio": [0.0, 1.0], "seed": [0, 1]}, {"norm": ["mbn"], "clean_ratio": [1.0], "seed": [0, 1]}]
ACCURACIES = {"acc_clean": 0.6, "acc_pgd_5": 0.4, "acc_pgd_10": 0.3}


def figure_data(norm: str, gap: float) -> dict[str, Any]:
    channels = list(range(0, 40, 2))
    ramp = {"mean": [0.1 * c for c in range(20)], "var": [1.0 + 0.05 * c for c in range(20)]}
    shifted = {"mean": [0.1 * c + 0.3 for c in range(20)], "var": [1.5 + 0.05 * c for c in range(20)]}
    base = {"layer": "layer2.1.bn1", "channels": channels, "domain_gap": gap, "layers": 20}
    if norm == "mbn":
        return base | {"running": {"clean": ramp, "adv": shifted}, "gap_of": "running statistics"}
    return base | {"running": {"main": shifted}, "batch": {"clean": ramp, "adv": shifted}, "images": 100}


GAPS = {("bn", 0.0): [0.10, 0.14], ("bn", 1.0): [0.02, 0.04], ("mbn", 1.0): [0.30, 0.50]}


def records_with_statistics(with_data: bool) -> tuple[Any, list[dict[str, Any]]]:
    spec = make_spec(DIGITS_WORKLOAD, GRID)
    records = []
    for cell in expand(spec):
        axes = cell.axes
        branches = {"mbn_adv": ACCURACIES, "mbn_clean": ACCURACIES} if axes["norm"] == "mbn" else {"main": ACCURACIES}
        rec = record(cell, branches)
        if with_data:
            gap = GAPS[(axes["norm"], axes["clean_ratio"])][axes["seed"]]
            rec |= {"domain_gap": gap, "bn_statistics": figure_data(axes["norm"], gap)}
        records.append(rec)
    return spec, records


def test_report_draws_figures_5_and_6_and_the_gap_per_setting_from_results_parquet(tmp_path: Path) -> None:
    spec, records = records_with_statistics(with_data=True)
    storage = write_sweep(str(tmp_path / "rep"), spec, records)
    table = pq.read_table(storage.path(RESULTS_FILE))
    assert {"domain_gap", "bn_statistics"} <= set(table.column_names)
    assert table.schema.field("domain_gap").type == "double"
    assert not Path(storage.path("cells")).exists()  # results.parquet alone carries the figures' data

    build_report(storage.url)
    markdown = read_text(storage, "report", "report.md")
    folder = Path(storage.path("report"))
    for name in ("mbn_running_statistics.png", "bn_batch_statistics.png"):
        png = (folder / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        assert f"]({name})" in markdown
    section = markdown.split("## Two domains")[1].split("\n## ")[0]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in section.splitlines() if "% clean |" in line}
    assert len(rows) == len(GAPS)
    for (norm, ratio), values in GAPS.items():
        label = ("MBN, " if norm == "mbn" else "") + f"100% adv + {ratio:.0%} clean"
        mean = sum(values) / 2
        std = abs(values[0] - values[1]) / math.sqrt(2)
        assert rows[label][3].strip(" |") == f"{mean:.3g} ± {std:.2g}", (label, rows[label])
        assert rows[label][2] == "2"
    # Figure 6 shows the BN cell at clean ratio 0 (the paper's setting), seed 0; Figure 5 an MBN cell.
    assert f"Figure 6 (BN batch vs running statistics): cell `{cell_id(spec, 'bn', 0.0, 0)}`" in section
    assert f"Figure 5 (MBN running statistics): cell `{cell_id(spec, 'mbn', 1.0, 0)}`" in section


def cell_id(spec: Any, norm: str, clean_ratio: float, seed: int) -> str:
    wanted = {"norm": norm, "clean_ratio": clean_ratio, "seed": seed}
    return next(c.cell_id for c in expand(spec) if all(c.axes[k] == v for k, v in wanted.items()))


def test_report_without_statistics_leaves_the_figures_out_and_says_so(tmp_path: Path) -> None:
    spec, records = records_with_statistics(with_data=False)
    storage = write_sweep(str(tmp_path / "rep"), spec, records)
    assert "domain_gap" not in pq.read_table(storage.path(RESULTS_FILE)).column_names  # columns as before
    build_report(storage.url)
    markdown = read_text(storage, "report", "report.md")
    assert "## Two domains" not in markdown
    assert not list(Path(storage.path("report")).glob("*statistics.png"))
    assert "BN statistics (Figures 5 and 6, the domain gap): no finished cell recorded them" in markdown
