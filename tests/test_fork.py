"""Forking BN* cells from their BN twins (the spec's `fork_bn_star`; paper Section 4.3, Table 2): twin matching,
unchanged cell ids, the refusals, the plan's savings, the training loop's fork points, and one sweep on Ray whose
forked BN* cell ends exactly where the same cell trained from scratch ends."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import sweep
from orchestrator.grid import Cell, Fork, cell_id, expand, fork_mismatch, fork_twins
from orchestrator.plan import fork_saved_device_hours, plan_spec
from orchestrator.plan_output import format_plan, plan_to_json
from orchestrator.spec import Spec, parse_spec
from orchestrator.storage import CONFIG_FILE, ERROR_FILE, HISTORY_FILE, RESULT_FILE, SweepStorage
from tests.conftest import tiny_spec, write_spec
from workloads.config import ForkConfig, TrainConfig, fork_point_file

EPOCHS = 4  # BN* for the last round(4 x 10 / 110) -> 1 epoch: twins share epochs 0..2, the fork trains epoch 3


def spec_of(grid: dict[str, Any] | list[dict[str, Any]], model: dict[str, Any] | None = None, **overrides: Any) -> Spec:
    workload = {"recipe": {"epochs": EPOCHS}, "model": model or {}}
    document = tiny_spec("forks", grid, workload=workload, **overrides)
    return parse_spec(yaml.safe_dump(document))


def by_axes(cells: list[Cell]) -> dict[tuple[str, int], Cell]:
    return {(cell.axes["norm"], cell.axes["seed"]): cell for cell in cells}


# ------------------------------------------------------------------------------------------------------------
# Twins and ids


def test_each_bn_star_cell_forks_from_the_bn_cell_with_its_seed_and_mbn_star_from_mbn() -> None:
    cells = expand(spec_of({"norm": ["bn", "bn*", "mbn", "mbn*", "gn"], "clean_ratio": [0.5], "seed": [0, 1]}))
    forks, twinless = fork_twins(cells)
    cell = by_axes(cells)
    expected = {
        cell[(star, seed)].cell_id: Fork(cell[(star, seed)].cell_id, cell[(plain, seed)].cell_id, EPOCHS - 1)
        for star, plain in (("bn*", "bn"), ("mbn*", "mbn"))
        for seed in (0, 1)
    }
    assert forks == expected
    assert twinless == []


def test_a_bn_star_cell_without_its_twin_in_the_grid_trains_from_scratch_and_the_plan_says_so() -> None:
    # BN* at PGD-2 has no BN cell at PGD-2: the only BN cell differs in the attack, so it is no twin.
    spec = spec_of([{"norm": ["bn", "bn*"], "pgd_steps": [1]}, {"norm": ["bn*"], "pgd_steps": [2]}], fork_bn_star=True)
    cells = expand(spec)
    forks, twinless = fork_twins(cells)
    alone = next(c for c in cells if c.axes["pgd_steps"] == 2)
    assert [c.cell_id for c in twinless] == [alone.cell_id]
    assert len(forks) == 1 and alone.cell_id not in forks
    plan = plan_spec(spec, cells)
    assert plan.twinless == (alone.cell_id,)
    assert f"have no BN twin in the grid (or use BN* from the first epoch) and train from scratch: {alone.cell_id}" in (
        format_plan(plan)
    )
    assert plan_to_json(plan)["twinless_bn_star_cells"] == [alone.cell_id]


def test_bn_star_over_every_epoch_shares_nothing_and_has_no_fork() -> None:
    spec = spec_of({"norm": ["bn", "bn*"]}, model={"bn_star_epochs": EPOCHS})
    forks, twinless = fork_twins(expand(spec))
    assert forks == {} and [c.axes["norm"] for c in twinless] == ["bn*"]


def test_the_option_and_a_cells_fork_settings_leave_every_cell_id_unchanged() -> None:
    grid = {"norm": ["bn", "bn*", "mbn", "mbn*"], "seed": [0, 1]}
    off, on = expand(spec_of(grid)), expand(spec_of(grid, fork_bn_star=True))
    assert [c.cell_id for c in on] == [c.cell_id for c in off]
    for cell in on:
        saving = cell.with_fork(ForkConfig(save_epochs=(3,), save_to="/somewhere/fork_point"))
        starting = cell.with_fork(ForkConfig(start_from="/somewhere/epoch_3.pt", parent="0123456789ab"))
        assert cell_id(saving.config) == cell_id(starting.config) == cell.cell_id
        # Never dumped: config.json, results.parquet and the tracked parameters stay as they were.
        assert "fork" not in starting.config.model_dump(mode="json")
        assert starting.config.fork is not None and starting.config.fork.parent == "0123456789ab"


def test_fork_mismatch_names_the_first_field_that_differs_beyond_bn_star() -> None:
    cell = by_axes(expand(spec_of({"norm": ["bn", "bn*", "mbn"]})))
    parent, fork = cell[("bn", 0)].config, cell[("bn*", 0)].config
    assert fork_mismatch(parent, fork) is None
    other_lr = parent.model_copy(update={"recipe": parent.recipe.model_copy(update={"base_lr": 0.2})})
    assert fork_mismatch(other_lr, fork) == "recipe.base_lr is 0.2 in the parent but 0.4 in the fork"
    assert fork_mismatch(cell[("mbn", 0)].config, fork) == "model.norm is 'mbn' in the parent but 'bn' in the fork"
    assert "a parent trains without BN*" in (fork_mismatch(fork, fork) or "")


# ------------------------------------------------------------------------------------------------------------
# Refusals (orchestrator.sweep.fork_refusal)


@pytest.fixture
def twins(tmp_path: Path) -> tuple[SweepStorage, Fork, Cell, Cell]:
    cells = expand(spec_of({"norm": ["bn", "bn*"]}, fork_bn_star=True))
    forks, _ = fork_twins(cells)
    (fork,) = forks.values()
    parent = next(c for c in cells if c.cell_id == fork.parent)
    child = next(c for c in cells if c.cell_id == fork.cell_id)
    return SweepStorage(str(tmp_path / "forks")), fork, parent, child


def finish(storage: SweepStorage, cell: Cell, config: TrainConfig | None = None) -> None:
    train = (config or cell.config).model_dump(mode="json")
    storage.write_json(storage.cell_path(cell.cell_id, CONFIG_FILE), {"cell_id": cell.cell_id, "train": train})
    storage.write_json(storage.cell_path(cell.cell_id, RESULT_FILE), {"cell_id": cell.cell_id, "status": "finished"})


def save_marker(storage: SweepStorage, fork: Fork) -> None:
    folder = sweep.fork_folder(storage, fork.parent)
    storage.write_json(fork_point_file(storage.cell_path(fork.parent, "fork_point"), fork.epoch, ".json"), {})
    assert folder.endswith(f"cells/{fork.parent}/fork_point")


def refusal(twins: tuple[SweepStorage, Fork, Cell, Cell]) -> str | None:
    storage, fork, parent, child = twins
    return sweep.fork_refusal(storage, fork, child.config, parent.axes)


def test_a_fork_whose_parent_has_no_result_is_refused_naming_both_cells(twins: Any) -> None:
    _, fork, _, _ = twins
    message = refusal(twins)
    assert (
        message
        == f"cell {fork.cell_id} cannot fork from cell {fork.parent} ({twins[2].describe()}): the parent has no result"
    )


def test_a_fork_whose_parent_failed_is_refused_with_the_parents_error(twins: Any) -> None:
    storage, fork, parent, _ = twins
    storage.write_json(storage.cell_path(parent.cell_id, ERROR_FILE), {"status": "failed", "error": "loss is NaN"})
    message = refusal(twins) or ""
    assert message.startswith(f"cell {fork.cell_id} cannot fork from cell {fork.parent} (")
    assert message.endswith("the parent failed: loss is NaN")


def test_a_fork_whose_parents_stored_config_differs_is_refused_naming_the_field(twins: Any) -> None:
    storage, fork, parent, _ = twins
    other = parent.config.model_copy(update={"recipe": parent.config.recipe.model_copy(update={"base_lr": 0.2})})
    finish(storage, parent, other)
    save_marker(storage, fork)
    message = refusal(twins) or ""
    assert f"cell {fork.cell_id} cannot fork from cell {fork.parent}" in message
    assert message.endswith("their configs differ beyond BN*: recipe.base_lr is 0.2 in the parent but 0.4 in the fork")


def test_a_fork_whose_parent_saved_no_fork_point_is_refused_and_one_that_did_is_not(twins: Any) -> None:
    storage, fork, parent, _ = twins
    finish(storage, parent)
    message = refusal(twins) or ""
    assert message.endswith(
        f"the parent saved no fork point at epoch {fork.epoch} (it trained without fork_bn_star, "
        "or before that epoch was asked for)"
    )
    save_marker(storage, fork)
    assert refusal(twins) is None


def test_a_forks_history_gets_its_parents_prefix_marked_and_keeps_its_own_epochs(twins: Any) -> None:
    storage, fork, parent, child = twins
    parent_rows = [{"epoch": e, "loss": 10.0 - e} for e in range(1, EPOCHS + 1)]
    storage.write_json(
        storage.cell_path(parent.cell_id, HISTORY_FILE), {"cell_id": parent.cell_id, "epochs": parent_rows}
    )
    own = [{"epoch": EPOCHS, "loss": 0.5}]
    storage.write_json(storage.cell_path(child.cell_id, HISTORY_FILE), {"cell_id": child.cell_id, "epochs": own})
    record = {"cell_id": child.cell_id, "status": "finished", "forked_from": parent.cell_id}
    storage.write_json(storage.cell_path(child.cell_id, RESULT_FILE), record)
    sweep.copy_fork_histories(storage, [fork])
    epochs = storage.read_json(storage.cell_path(child.cell_id, HISTORY_FILE))["epochs"]
    assert epochs == [{"epoch": e, "loss": 10.0 - e, "forked_from": parent.cell_id} for e in range(1, EPOCHS)] + own


# ------------------------------------------------------------------------------------------------------------
# Plan


def test_the_plan_leaves_the_forks_prefix_epochs_out_of_the_total_and_runs_forks_second() -> None:
    grid = {"norm": ["bn", "bn*", "gn"], "seed": [0, 1]}
    off, on = plan_spec(spec_of(grid)), plan_spec(spec_of(grid, fork_bn_star=True))
    cells = {c.cell_id: c for c in expand(spec_of(grid))}
    assert len(on.forks) == 2 and off.forks == ()
    for fork in on.forks:
        assert fork.epoch == EPOCHS - 1
        config = cells[fork.cell_id].config
        assert fork.saved_device_hours == pytest.approx(fork_saved_device_hours(config, fork.epoch, on.planning))
        # The prefix is a share of the training epochs: less than the cell, more than half of it here (3 of 4).
        before = next(p for p in off.cells if p.cell_id == fork.cell_id).device_hours
        after = next(p for p in on.cells if p.cell_id == fork.cell_id).device_hours
        assert after == pytest.approx(before - fork.saved_device_hours)
        assert 0 < fork.saved_device_hours < before
    assert on.total_device_hours == pytest.approx(off.total_device_hours - on.fork_saved_device_hours)
    forked = {f.cell_id for f in on.forks}
    first_round_end = max(p.end_hours for p in on.cells if p.cell_id not in forked)
    assert all(p.start_hours >= first_round_end for p in on.cells if p.cell_id in forked)
    document = plan_to_json(on)
    assert document["fork_saved_device_hours"] == pytest.approx(on.fork_saved_device_hours)
    assert {f["cell_id"] for f in document["forks"]} == forked
    assert "2 BN* cells start from their BN twins' state at the switch epoch" in format_plan(on)
    assert "forks" not in format_plan(off)


# ------------------------------------------------------------------------------------------------------------
# The training loop: fork points and forks, without Ray


@pytest.fixture(scope="module")
def synthetic_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    from workloads.data import synthetic_to_parquet

    url = str(tmp_path_factory.mktemp("datasets") / "synthetic")
    synthetic_to_parquet(url, 128, (1, 16, 16), 10, seed=3, num_test=32, shard_size=64)
    return url


@pytest.fixture
def one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def loop_cell(url: str, bn_star_epochs: int, fork: ForkConfig | None = None) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "data": {"url": url, "shuffle_buffer": 64},
            "model": {"depth": 18, "width": 1 / 16, "stem": "small", "norm": "mbn", "bn_star_epochs": bn_star_epochs},
            "attack": {"steps": 1},
            "training": {"strategy": "mixture", "clean_ratio": 0.5},
            "recipe": {"epochs": 3, "batch_size": 32, "per_worker_batch": 16, "base_lr": 0.8, "warmup_epochs": 1},
            "eval": {"pgd_steps": [1], "subset": 16, "batch_size": 16},
            "checkpoint_every": 2,
        }
    ).model_copy(update={"fork": fork})


def test_a_fork_started_from_its_parents_fork_point_ends_exactly_as_from_scratch(
    synthetic_url: str, tmp_path: Path, one_thread: None
) -> None:
    from workloads.sessions import LocalSession
    from workloads.train import run

    points = str(tmp_path / "parent" / "fork_point")
    run(loop_cell(synthetic_url, 0, ForkConfig(save_epochs=(2,), save_to=points)), LocalSession(tmp_path / "parent"))
    assert sorted(p.name for p in Path(points).iterdir()) == ["epoch_2.json", "epoch_2.pt"]
    assert json.loads(Path(fork_point_file(points, 2, ".json")).read_text())["epoch"] == 2

    scratch = LocalSession(tmp_path / "scratch")
    whole = run(loop_cell(synthetic_url, 1), scratch)
    forked = LocalSession(tmp_path / "fork")
    start = ForkConfig(start_from=fork_point_file(points, 2), parent="parent-id")
    final = run(loop_cell(synthetic_url, 1, start), forked)
    assert [(h["epoch"], h["start_epoch"]) for h in forked.history] == [(3, 2)]  # the suffix only
    assert forked.history[-1]["loss"] == scratch.history[-1]["loss"]  # ==, not approx
    evals = {k: v for k, v in whole.items() if k.startswith("eval/")}
    assert evals and {k: v for k, v in final.items() if k.startswith("eval/")} == evals
    assert final["forked_from"] == "parent-id" and "forked_from" not in whole
    assert final["train_seconds"] < whole["train_seconds"]  # its own epoch only, not the parent's

    # A fork point at another epoch than the fork's switch is refused: it would train another cell.
    with pytest.raises(ValueError, match="switches to BN\\* at epoch 1"):
        run(loop_cell(synthetic_url, 2, start), LocalSession(tmp_path / "wrong"))


# ------------------------------------------------------------------------------------------------------------
# One sweep on Ray


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_a_forked_bn_star_cell_on_ray_equals_the_same_cell_trained_from_scratch(
    ray_local: None, tmp_path: Path
) -> None:
    epochs = 3  # BN* for the last epoch: the fork trains epoch 3 only
    workload = {"recipe": {"epochs": epochs}}
    forking = tiny_spec("forking", {"norm": ["bn", "bn*"]}, workload=workload, fork_bn_star=True)
    scratch = tiny_spec("scratch", {"norm": ["bn*"]}, workload=workload)
    storage = tmp_path / "runs"
    assert sweep.main([str(write_spec(tmp_path, forking)), "--storage", str(storage)]) == sweep.EXIT_OK
    assert sweep.main([str(write_spec(tmp_path, scratch)), "--storage", str(storage)]) == sweep.EXIT_OK

    (fork,) = fork_twins(expand(parse_spec(yaml.safe_dump(forking))))[0].values()
    assert fork.epoch == epochs - 1
    forked_dir = storage / "forking" / "cells" / fork.cell_id
    scratch_dir = storage / "scratch" / "cells" / fork.cell_id  # the same cell id in both sweeps
    forked, whole = (json.loads((d / RESULT_FILE).read_text()) for d in (forked_dir, scratch_dir))
    assert forked["forked_from"] == fork.parent and "forked_from" not in whole
    assert forked["resumed_from_epoch"] == fork.epoch and whole["resumed_from_epoch"] == 0
    assert forked["epochs"] == whole["epochs"] == epochs
    assert forked["branches"] == whole["branches"]  # exactly: the same arithmetic on the CPU
    parent_points = storage / "forking" / "cells" / fork.parent / "fork_point"
    assert (parent_points / f"epoch_{fork.epoch}.pt").is_file()

    forked_history = json.loads((forked_dir / HISTORY_FILE).read_text())["epochs"]
    whole_history = json.loads((scratch_dir / HISTORY_FILE).read_text())["epochs"]
    assert [r["epoch"] for r in forked_history] == [r["epoch"] for r in whole_history] == [1, 2, 3]
    assert [r.get("forked_from") for r in forked_history] == [fork.parent, fork.parent, None]
    assert forked_history[-1]["loss"] == whole_history[-1]["loss"]
    # The copied prefix is the parent's own training, which is the from-scratch cell's too.
    assert [r["loss"] for r in forked_history[:2]] == [r["loss"] for r in whole_history[:2]]
