"""Grid expansion: products, unions, derived values, normalisation, stable ids, duplicate collapse."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.grid import Cell, bn_star_epochs, cell_id, expand
from orchestrator.spec import AXES, Spec, SpecError, load_spec
from tests.test_spec import _DROP, make_spec, spec_text

ROOT = Path(__file__).resolve().parents[1]


def ids(cells: list[Cell]) -> list[str]:
    return [c.cell_id for c in cells]


def test_mapping_is_a_cartesian_product_in_axis_order() -> None:
    cells = expand(make_spec(grid={"seed": [0, 1], "norm": ["bn", "gn", "mbn"], "depth": [18, 34]}))
    assert len(cells) == 12
    # Axis order (clean_ratio, norm, pgd_steps, depth, ...), last axis fastest, whatever the YAML order.
    assert [(c.axes["norm"], c.axes["depth"], c.axes["seed"]) for c in cells[:4]] == [
        ("bn", 18, 0),
        ("bn", 18, 1),
        ("bn", 34, 0),
        ("bn", 34, 1),
    ]
    assert all(list(c.axes) == list(AXES) for c in cells)
    assert len(set(ids(cells))) == 12


def test_list_is_a_union_of_products() -> None:
    cells = expand(make_spec(grid=[{"norm": ["bn", "gn"]}, {"depth": [34], "seed": [5, 6]}]))
    assert [(c.axes["norm"], c.axes["depth"], c.axes["seed"]) for c in cells] == [
        ("bn", 18, 0),
        ("gn", 18, 0),
        ("bn", 34, 5),
        ("bn", 34, 6),
    ]


def test_axes_not_in_the_grid_take_the_workload_defaults() -> None:
    (cell,) = expand(make_spec(grid=_DROP))
    assert cell.axes == {
        "clean_ratio": 0.0,
        "norm": "bn",
        "pgd_steps": 3,
        "depth": 18,
        "batch_size": 64,
        "strategy": "mixture",
        "seed": 0,
    }
    assert cell.config.model.depth == 18 and cell.config.attack.steps == 3 and cell.config.seed == 0


def test_duplicates_collapse_keeping_first_seen_order() -> None:
    cells = expand(make_spec(grid=[{"seed": [1, 0, 1]}, {"seed": [0, 2], "norm": ["bn"]}]))
    assert [c.axes["seed"] for c in cells] == [1, 0, 2]


def test_config_carries_the_axes_and_resources() -> None:
    spec = make_spec(grid={"clean_ratio": [0.5], "norm": ["gn"], "pgd_steps": [10], "depth": [34], "seed": [7]})
    (cell,) = expand(spec)
    c = cell.config
    assert (c.training.clean_ratio, c.model.norm, c.attack.steps, c.model.depth, c.seed) == (
        0.5,
        "gn",
        10,
        34,
        7,
    )
    assert c.use_gpu is False and cell.gpus == 0
    assert c.checkpoint_every == spec.checkpoint_every and c.keep_checkpoints == spec.keep_checkpoints
    assert cell.cpus_per_worker == 0.5 and cell.max_failures == spec.max_failures
    # The workload's other fields pass through untouched.
    assert c.data == spec.workload.data and c.eval == spec.workload.eval


# --- derived values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("steps", "size"), [(5, 4.0), (10, 2.0), (20, 1.0), (30, 1.0)])
def test_step_size_from_pgd_steps(steps: int, size: float) -> None:
    # Appendix B.1, footnote 6: step 4 for PGD-5, 2 for PGD-10, 1 otherwise (Section 3).
    (cell,) = expand(make_spec(grid={"pgd_steps": [steps]}, workload={"recipe": {"epochs": 3}}))
    assert cell.config.attack.step_size == size


def test_explicit_step_size_wins() -> None:
    as_given = {"attack": {"step_size": 0.5, "reach_eps": False}}
    cells = expand(make_spec(grid={"pgd_steps": [5, 30]}, workload=as_given))
    assert [c.config.attack.step_size for c in cells] == [0.5, 0.5]
    # With the pipeline's floor (adv_model.py, PGDAttacker): at least eps/N, here eps 16.
    cells = expand(make_spec(grid={"pgd_steps": [5, 30]}, workload={"attack": {"step_size": 0.8}}))
    assert [c.config.attack.step_size for c in cells] == [pytest.approx(16 / 5), 0.8]


@pytest.mark.parametrize(
    ("batch", "max_workers", "workers", "accum"),
    [(4096, 128, 128, 1), (8192, 128, 128, 2), (512, 128, 16, 1), (1024, 16, 16, 2), (32, 128, 1, 1)],
)
def test_workers_and_accumulation_from_batch_size(batch: int, max_workers: int, workers: int, accum: int) -> None:
    spec = make_spec(
        grid={"batch_size": [batch]},
        resources={"use_gpu": True, "gpus_per_worker": 1, "max_workers_per_cell": max_workers},
    )
    (cell,) = expand(spec)
    assert (cell.num_workers, cell.grad_accum_steps, cell.gpus) == (workers, accum, workers)
    assert cell.config.num_workers == workers and cell.config.use_gpu
    # Linear scaling rule: lr follows the batch size, nothing stored (Section 3; Goyal et al. 2017).
    assert cell.config.recipe.lr == pytest.approx(0.1 * batch / 256)


def test_gpus_per_worker_multiplies() -> None:
    (cell,) = expand(make_spec(grid={"batch_size": [128]}, resources={"use_gpu": True, "gpus_per_worker": 2}))
    assert (cell.num_workers, cell.gpus, cell.gpus_per_worker) == (2, 4, 2)


@pytest.mark.parametrize(("epochs", "k"), [(110, 10), (3, 1), (22, 2), (1, 1), (55, 5)])
def test_bn_star_epochs_scale_with_the_run(epochs: int, k: int) -> None:
    # Section 4.3: running statistics for the last 10 of 110 epochs.
    assert bn_star_epochs(epochs) == k
    cells = expand(make_spec(grid={"norm": ["bn", "bn*", "mbn*", "gn"]}, workload={"recipe": {"epochs": epochs}}))
    assert [(c.axes["norm"], c.config.model.norm, c.config.model.bn_star_epochs) for c in cells] == [
        ("bn", "bn", 0),
        ("bn*", "bn", k),
        ("mbn*", "mbn", k),
        ("gn", "gn", 0),
    ]


def test_workload_bn_star_epochs_sets_k_and_the_default_norm() -> None:
    cells = expand(make_spec(grid={"norm": ["bn", "bn*"]}, workload={"model": {"bn_star_epochs": 2}}))
    assert [c.config.model.bn_star_epochs for c in cells] == [0, 2]
    (default,) = expand(make_spec(grid=_DROP, workload={"model": {"bn_star_epochs": 2}}))
    assert default.axes["norm"] == "bn*" and default.config.model.bn_star_epochs == 2


# --- strategies -------------------------------------------------------------------------------------------


def test_standard_normalises_and_collapses() -> None:
    grid = {"strategy": ["standard", "mixture"], "clean_ratio": [0.0, 0.5, 1.0], "pgd_steps": [5, 10]}
    cells = expand(make_spec(grid=grid))
    standard = [c for c in cells if c.axes["strategy"] == "standard"]
    assert len(standard) == 1 and len(cells) == 1 + 3 * 2
    (cell,) = standard
    assert cell.axes["clean_ratio"] == 1.0 and cell.axes["pgd_steps"] == 0
    assert cell.config.attack.steps == 0 and cell.config.training.clean_ratio == 1.0


def test_alp_with_clean_ratio_zero_names_the_grid_entry() -> None:
    # parse_spec rejects this already; a Spec built in Python must be rejected by expand() too.
    data = yaml.safe_load(spec_text(grid=[{"strategy": ["mixture"]}, {"strategy": ["alp"], "clean_ratio": [0, 0.5]}]))
    with pytest.raises(SpecError) as info:
        expand(Spec.model_validate(data))
    assert info.value.message.startswith("grid[1].strategy: 'alp' cannot be combined with clean_ratio 0")
    assert "(from grid[1].clean_ratio)" in info.value.message


def test_alp_error_is_raised_when_parsing_too() -> None:
    with pytest.raises(SpecError, match=r"^grid\.strategy: 'alp' .*workload\.training\.clean_ratio"):
        make_spec(grid={"strategy": ["alp"]})
    cells = expand(make_spec(grid={"strategy": ["alp"], "clean_ratio": [0.5, 1.0]}))
    assert [c.config.training.strategy for c in cells] == ["alp", "alp"]


def test_invalid_cell_config_names_the_cell() -> None:
    spec = make_spec(grid={"norm": ["bn", "bn*"]}, workload={"model": {"bn_star_epochs": 5}, "recipe": {"epochs": 3}})
    with pytest.raises(SpecError) as info:
        expand(spec)
    message = info.value.message
    assert message.startswith("cell clean_ratio=0.0 norm=bn* pgd_steps=3 depth=18 batch_size=64 strategy=mixture")
    assert "bn_star_epochs 5 exceeds recipe.epochs 3" in message


# --- ids --------------------------------------------------------------------------------------------------


def test_ids_are_12_hex_digits_and_stable_across_loads() -> None:
    first, second = expand(make_spec()), expand(make_spec())
    assert ids(first) == ids(second)
    assert all(len(i) == 12 and int(i, 16) >= 0 for i in ids(first))
    assert all(c.cell_id == cell_id(c.config) for c in first)


def test_ids_are_stable_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(spec_text())
    code = (
        "import json, sys; from orchestrator.spec import load_spec; from orchestrator.grid import expand; "
        "print(json.dumps([c.cell_id for c in expand(load_spec(sys.argv[1]))]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == ids(expand(make_spec()))


def test_changing_a_trained_value_changes_the_id() -> None:
    base = ids(expand(make_spec()))
    assert ids(expand(make_spec(workload={"recipe": {"epochs": 4}}))) != base
    assert ids(expand(make_spec(workload={"attack": {"eps": 8.0}}))) != base
    assert set(ids(expand(make_spec(grid={"seed": [2, 3]})))).isdisjoint(base)


def test_operational_fields_do_not_change_the_id() -> None:
    base = ids(expand(make_spec()))
    assert ids(expand(make_spec(checkpoint_every=1, keep_checkpoints=5, max_failures=0))) == base
    assert ids(expand(make_spec(storage="s3://bucket/elsewhere", name="other"))) == base


def test_precision_is_part_of_the_id_and_compile_is_not() -> None:
    """bf16 may change results (docs/precision.md), so it makes a different cell; torch.compile only changes speed.
    The default section stays out of the hash, so cells planned before it existed keep their ids."""
    base = ids(expand(make_spec()))
    assert ids(expand(make_spec(workload={"performance": {"compile": True}}))) == base
    assert ids(expand(make_spec(workload={"performance": {"precision": "auto"}}))) == base
    assert set(ids(expand(make_spec(workload={"performance": {"precision": "bf16"}})))).isdisjoint(base)


def test_expand_imports_neither_torch_nor_ray() -> None:
    code = (
        "import sys; import orchestrator.spec, orchestrator.grid, orchestrator.plan; "
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_standard_training_with_mbn_is_rejected_naming_the_cell() -> None:
    """Standard training has no adversarial images: an MBN cell would train only its clean branch and report an
    untrained adversarial one (Section 4.2), so the combination is an error, not a silently useless cell."""
    with pytest.raises(SpecError) as err:
        expand(make_spec(grid={"norm": ["bn", "mbn"], "strategy": ["mixture", "standard"]}))
    message = err.value.message
    assert "norm=mbn" in message and "strategy=standard" in message
    assert "use norm bn for standard training" in message
    # The same study without that one combination is fine: MBN with mixture, BN with both.
    cells = expand(make_spec(grid=[{"norm": ["bn", "mbn"]}, {"strategy": ["standard"]}]))
    assert {(c.axes["norm"], c.axes["strategy"]) for c in cells} == {
        ("bn", "mixture"),
        ("mbn", "mixture"),
        ("bn", "standard"),
    }


# --- the public pipeline's recipe and ids -----------------------------------------------------------------

PIPELINE_AS_BEFORE = {
    "recipe": {"nesterov": False, "label_smoothing": 0.0, "weight_decay_on": "all", "warmup_epochs": 0},
    "attack": {"reach_eps": False},
}


@pytest.mark.parametrize("study", ["digits-strong-gap", "digits-weak-gap", "digits-strong-width"])
def test_studies_that_keep_the_earlier_recipe_keep_the_ids_of_their_committed_results(study: str) -> None:
    """The pipeline's recipe fields enter an id only where they change training: these studies set the earlier
    recipe, so their cells are still the ones whose results docs/results/ holds."""
    import pyarrow.parquet as pq

    results = pq.read_table(ROOT / "docs" / "results" / study / "results.parquet", columns=["cell_id"])
    assert set(ids(expand(load_spec(ROOT / "sweeps" / f"{study}.yaml")))) == set(results.column("cell_id").to_pylist())


def test_each_pipeline_field_changes_the_id_only_where_it_changes_training() -> None:
    before = make_spec(grid={"pgd_steps": [1]}, workload=PIPELINE_AS_BEFORE)
    (base,) = ids(expand(before))

    def changed(section: str, **fields: object) -> str:
        workload = {**PIPELINE_AS_BEFORE, section: {**PIPELINE_AS_BEFORE[section], **fields}}
        (new,) = ids(expand(make_spec(grid={"pgd_steps": [1]}, workload=workload)))
        return new

    for field, value in [("nesterov", True), ("label_smoothing", 0.1), ("weight_decay_on", "conv_fc_weights")]:
        assert changed("recipe", **{field: value}) != base, field
    assert changed("recipe", warmup_epochs=5) != base
    assert changed("recipe", warmup_start_lr=0.5) == base  # no warm-up: the start LR is never used
    assert changed("attack", reach_eps=True) != base  # PGD-1: step 16 instead of 4
    # A set step that already reaches eps trains the same under either rule, and standard training has no step.
    assert changed("attack", step_size=16.0) == changed("attack", step_size=16.0, reach_eps=True)
    standard = {"grid": {"strategy": ["standard"]}}
    assert ids(expand(make_spec(**standard, workload=PIPELINE_AS_BEFORE))) == ids(
        expand(make_spec(**standard, workload={**PIPELINE_AS_BEFORE, "attack": {"reach_eps": True}}))
    )


def test_the_papers_cells_take_the_pipeline_recipe_and_new_ids() -> None:
    for name in ("ablation", "paper-study"):
        cells = expand(load_spec(ROOT / "sweeps" / f"{name}.yaml"))
        for cell in cells:
            recipe = cell.config.recipe
            assert (recipe.nesterov, recipe.label_smoothing, recipe.weight_decay_on) == (True, 0.1, "conv_fc_weights")
            assert recipe.warms_up() and (recipe.warmup_epochs, recipe.warmup_start_lr) == (5, 0.1)
            assert cell.config.attack.reach_eps
        # The same cells with the earlier recipe: the ids they had before the pipeline's fields existed.
        earlier = {
            cell_id(
                c.config.model_copy(update={"recipe": c.config.recipe.model_copy(update=PIPELINE_AS_BEFORE["recipe"])})
            )
            for c in cells
        }
        assert earlier.isdisjoint(ids(cells))  # every cell of the paper's studies has a new id, once


# The smoke sweep's cell ids as they were handed out: a change that alters one (a new config field entering the hash,
# a changed default) would orphan every stored checkpoint and result of existing sweeps. Change these literals only
# on purpose, and record why where the ids are made (orchestrator/grid.py).
SMOKE_IDS = [
    "d942a47a4de8",
    "be986870cc92",
    "800b0da7e687",
    "87ee0c26fbe6",
    "a49b463dc872",
    "5adeba9b4107",
    "b34eaff3a642",
    "164add912caa",
    "bb67c0550ddd",
    "f65e62847d03",
    "ae361ef47c40",
]


def test_the_smoke_sweeps_cell_ids_are_pinned() -> None:
    from pathlib import Path

    from orchestrator.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "sweeps" / "smoke.yaml")
    assert [cell.cell_id for cell in expand(spec)] == SMOKE_IDS
