"""KEY=VALUE overrides on the sweep's command line: applied to the YAML, validated like it, stored with the sweep."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator import sweep
from orchestrator.grid import expand
from orchestrator.overrides import OverrideError, apply_overrides
from orchestrator.spec import SpecError, load_spec, parse_spec

SMOKE = Path(__file__).resolve().parents[1] / "sweeps" / "smoke.yaml"
MAPPING_SPEC = "name: o\nworkload:\n  data: {url: builtin://digits}\n  recipe: {epochs: 3}\ngrid: {seed: [0]}\n"


def test_values_are_read_as_yaml_and_missing_mappings_are_created() -> None:
    data = yaml.safe_load(MAPPING_SPEC)
    out = apply_overrides(data, ["workload.recipe.epochs=2", "grid.seed=[0, 1, 2]", "workload.model.norm=gn"])
    assert out["workload"]["recipe"]["epochs"] == 2
    assert out["grid"]["seed"] == [0, 1, 2]
    assert out["workload"]["model"] == {"norm": "gn"}
    assert data["workload"]["recipe"]["epochs"] == 3  # the caller's document is untouched


def test_an_overridden_spec_expands_like_the_same_yaml_written_out() -> None:
    overridden = parse_spec(MAPPING_SPEC, overrides=["workload.recipe.epochs=2", "grid.seed=[0,1]"])
    written = parse_spec(MAPPING_SPEC.replace("epochs: 3", "epochs: 2").replace("[0]", "[0, 1]"))
    assert [c.cell_id for c in expand(overridden)] == [c.cell_id for c in expand(written)]
    assert "epochs: 2" in overridden.dump_yaml()  # what the sweep stores as spec.yaml


def test_list_form_grid_entries_are_named_by_index() -> None:
    spec = load_spec(SMOKE, ["grid[3].depth=[18, 34]"])
    assert spec.grid is not None and spec.grid[3].axes()["depth"] == [18, 34]
    with pytest.raises(SpecError, match=r"the grid is a list of 6 entries; name one, e.g. grid\[0\]\.seed"):
        load_spec(SMOKE, ["grid.seed=[0,1]"])
    with pytest.raises(SpecError, match=r"grid\[9\] does not exist"):
        load_spec(SMOKE, ["grid[9].seed=[0]"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("workload.recipe.epochs=zero", "workload.recipe.epochs: 'zero' is not an integer"),
        ("workload.recipe.epochs=0", "workload.recipe.epochs: 0 is out of range [1, 10000]"),
        ("workload.recipe.bogus=1", "workload.recipe.bogus: unknown key"),
        ("epochs", "expected KEY=VALUE"),
        ("workload..x=1", "is not a field name"),
        ("name.x=1", "name is not a mapping"),
        ("workload.recipe.epochs=[1", "the value is not valid YAML"),
        ("workload.data.url=builtin://digitz", "unknown built-in dataset 'builtin://digitz'"),
    ],
)
def test_bad_overrides_get_one_line_naming_the_field(override: str, message: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(MAPPING_SPEC, overrides=[override])
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_credential_through_an_override_is_refused_without_echo() -> None:
    secret = "AKIA" + "ABCDEFGHIJKLMNOP"
    with pytest.raises(SpecError) as err:
        parse_spec(MAPPING_SPEC, overrides=[f"storage=s3://{secret}:x@bucket/p"])
    assert secret not in str(err.value)


def test_the_cli_takes_overrides_before_and_after_options(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert sweep.main([str(SMOKE), "--plan", "--json", "grid[0].clean_ratio=[0.0]"]) == sweep.EXIT_OK
    narrowed = json.loads(capsys.readouterr().out)
    assert sweep.main([str(SMOKE), "--plan", "--json"]) == sweep.EXIT_OK
    full = json.loads(capsys.readouterr().out)
    assert len(narrowed["cells"]) == len(full["cells"]) - 2  # clean ratios 0.5 and 1.0 of grid[0] gone
    assert sweep.main([str(SMOKE), "workload.recipe.epochs=zero", "--plan"]) == sweep.EXIT_INVALID
    assert "error: workload.recipe.epochs: 'zero' is not an integer" in capsys.readouterr().err
    with pytest.raises(OverrideError):
        apply_overrides({}, ["=1"])
