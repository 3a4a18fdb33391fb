"""The report: paper-style tables parsed back from the Markdown, comparisons and verdicts, training health,
figures, partial sweeps, S3.

Every sweep here is hand-built: spec.yaml from a real Spec, results.parquet written by
`orchestrator.results.write_results` from hand-made records with known accuracies. No Ray, no training.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml
from scipy import stats as scipy_stats

from orchestrator import health, report
from orchestrator.grid import Cell, expand
from orchestrator.report import build_report
from orchestrator.results import write_results
from orchestrator.spec import Spec, parse_spec
from orchestrator.stats import binomial_se
from orchestrator.storage import SweepStorage
from workloads.fs import open_fs

DIGITS_WORKLOAD: dict[str, Any] = {
    "data": {"url": "builtin://digits"},
    "model": {"depth": 18, "norm": "bn", "width": 0.125, "stem": "small"},
    "attack": {"steps": 2, "eps": 16},
    "training": {"strategy": "mixture", "clean_ratio": 0.0},
    "recipe": {"epochs": 3, "batch_size": 64, "per_worker_batch": 32},
    "eval": {"pgd_steps": [5, 10], "subset": 200},
}
SEEDS = [0, 1, 2]
DIGITS_GRID = [
    {"clean_ratio": [0.0, 0.5, 1.0], "seed": SEEDS},
    {"norm": ["mbn"], "clean_ratio": [1.0], "seed": SEEDS},
    {"depth": [34], "seed": SEEDS},
]

# Accuracies per (setting, metric), one value per seed: evenly spaced values, so the sample std is the spacing.
R0 = {"acc_clean": [0.60, 0.62, 0.64], "acc_pgd_5": [0.40, 0.41, 0.42], "acc_pgd_10": [0.30, 0.31, 0.32]}
R50 = {"acc_clean": [0.70, 0.72, 0.74], "acc_pgd_5": [0.405, 0.415, 0.425], "acc_pgd_10": [0.20, 0.21, 0.22]}
R100 = {"acc_clean": [0.80], "acc_pgd_5": [0.30], "acc_pgd_10": [0.15]}  # seed 1 missing, seed 2 failed
DEPTH34 = {"acc_clean": [0.61, 0.63, 0.65], "acc_pgd_5": [0.419, 0.429, 0.439], "acc_pgd_10": [0.33, 0.35, 0.37]}
MBN_ADV = {"acc_clean": [0.50, 0.51, 0.52], "acc_pgd_5": [0.45, 0.46, 0.47], "acc_pgd_10": [0.40, 0.41, 0.42]}
# MBN_clean - MBN_adv per network: exactly +0.28 clean (no variance), -0.35/-0.34/-0.36 at PGD-10 (a paired test).
MBN_CLEAN = {"acc_clean": [0.78, 0.79, 0.80], "acc_pgd_5": [0.10, 0.11, 0.12], "acc_pgd_10": [0.05, 0.07, 0.06]}


def make_spec(workload: dict[str, Any], grid: list[dict[str, Any]], name: str = "rep") -> Spec:
    text = yaml.safe_dump(
        {
            "name": name,
            "storage": "./runs",
            "workload": workload,
            "grid": grid,
            "resources": {"use_gpu": False, "max_workers_per_cell": 1},
        },
        sort_keys=False,
    )
    return parse_spec(text, "test.yaml")


def record(cell: Cell, branches: dict[str, dict[str, float]], status: str = "finished") -> dict[str, Any]:
    return {
        "cell_id": cell.cell_id,
        "axes": cell.axes,
        "status": status,
        "branches": branches,
        "epochs": 3,
        "train_seconds": 30.0,
        "gpu_hours": 0.0,
        **({"error": "RuntimeError: boom in epoch 2"} if status == "failed" else {}),
    }


def values_at(table: dict[str, list[float]], seed: int) -> dict[str, float]:
    return {metric: values[seed] for metric, values in table.items()}


def digits_records(spec: Spec) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Records for DIGITS_GRID (clean ratio 1.0: seed 0 finished, seed 1 missing, seed 2 failed); the ids of the
    missing and failed cells."""
    records, ids = [], {}
    for cell in expand(spec):
        axes, seed = cell.axes, cell.axes["seed"]
        if axes["norm"] == "mbn":
            records.append(record(cell, {"mbn_adv": values_at(MBN_ADV, seed), "mbn_clean": values_at(MBN_CLEAN, seed)}))
        elif axes["depth"] == 34:
            records.append(record(cell, {"main": values_at(DEPTH34, seed)}))
        elif axes["clean_ratio"] == 0.0:
            records.append(record(cell, {"main": values_at(R0, seed)}))
        elif axes["clean_ratio"] == 0.5:
            records.append(record(cell, {"main": values_at(R50, seed)}))
        elif seed == 0:
            records.append(record(cell, {"main": values_at(R100, 0)}))
        elif seed == 1:
            ids["missing"] = cell.cell_id
        else:
            records.append(record(cell, {}, status="failed"))
            ids["failed"] = cell.cell_id
    return records, ids


def write_sweep(url: str, spec: Spec, records: list[dict[str, Any]]) -> SweepStorage:
    storage = SweepStorage(url)
    storage.write_bytes_atomic(storage.path("spec.yaml"), spec.dump_yaml().encode())
    write_results(storage, records)
    return storage


def read_text(storage: SweepStorage, *parts: str) -> str:
    with storage.fs.open(storage.path(*parts), "rb") as f:
        return f.read().decode("utf-8")


# ------------------------------------------------------------------------------------------------------------
# Reading the Markdown back

CELL = re.compile(r"^(?P<mean>-?\d+\.\d)(?: ± (?P<std>\d+\.\d))?(?: \(binomial ± (?P<binomial>\d+\.\d)\))?$")


def tables(markdown: str) -> list[dict[str, Any]]:
    """Every Markdown table: its section (## heading), its 'Fixed:' line (or ''), header and rows as dicts."""
    found: list[dict[str, Any]] = []
    section = fixed = ""
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section, fixed = line[3:], ""
        elif line.startswith("Fixed: "):
            fixed = line[len("Fixed: ") :]
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append([c.strip().replace("\\*", "*") for c in lines[i].strip().strip("|").split(" | ")])
                i += 1
            header, rows = block[0], block[2:]
            assert all(len(r) == len(header) for r in rows), block
            parsed = [dict(zip(header, r, strict=True)) for r in rows]
            found.append({"section": section, "fixed": fixed, "header": header, "rows": parsed})
            continue
        i += 1
    return found


def table_in(markdown: str, section_start: str, fixed_contains: str = "", comparisons: bool = False) -> dict[str, Any]:
    """The one table of a section (and 'Fixed:' line): its levels, or with `comparisons` the comparisons below."""
    matches = [
        t
        for t in tables(markdown)
        if t["section"].startswith(section_start)
        and fixed_contains in t["fixed"]
        and (t["header"][0] == "comparison") == comparisons
    ]
    assert len(matches) == 1, f"{len(matches)} tables in {section_start!r} with {fixed_contains!r}"
    return matches[0]


def row(table: dict[str, Any], label: str) -> dict[str, str]:
    (found,) = [r for r in table["rows"] if r[table["header"][0]] == label]
    return found


def cell(text: str) -> dict[str, Any]:
    match = CELL.match(text)
    assert match, f"not a result cell: {text!r}"
    return {
        "mean": float(match["mean"]),
        "std": float(match["std"]) if match["std"] else None,
        "binomial": float(match["binomial"]) if match["binomial"] else None,
    }


def comparison(table: dict[str, Any], label: str, metric: str) -> dict[str, str]:
    (found,) = [r for r in table["rows"] if r["comparison"] == label and r["accuracy"] == metric]
    return found


def welch_text(a: list[float], b: list[float]) -> tuple[str, str]:
    """Δ [95% CI] and p as the report prints them, from scipy's Welch test on accuracies in points."""
    result = scipy_stats.ttest_ind([100 * v for v in a], [100 * v for v in b], equal_var=False)
    ci = result.confidence_interval(0.95)
    delta = 100 * (sum(a) / len(a) - sum(b) / len(b))
    p = float(result.pvalue)
    return (
        f"{delta:+.1f} [{ci.low:+.1f}, {ci.high:+.1f}]",
        "<0.001" if p < 0.001 else f"{p:.2f}" if p >= 0.1 else f"{p:.3f}",
    )


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# ------------------------------------------------------------------------------------------------------------
# One local sweep, reported once for the tests that only read it


@pytest.fixture(scope="module")
def digits_sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    spec = make_spec(DIGITS_WORKLOAD, DIGITS_GRID)
    records, ids = digits_records(spec)
    storage = write_sweep(str(tmp_path_factory.mktemp("sweeps") / "rep"), spec, records)
    storage.write_bytes_atomic(storage.path("report", "stale-figure.png"), b"\x89PNG old")
    url = build_report(storage.url)
    return {"storage": storage, "url": url, "markdown": read_text(storage, "report", "report.md"), "ids": ids}


def test_build_report_returns_the_report_url(digits_sweep: dict[str, Any]) -> None:
    assert digits_sweep["url"] == f"{digits_sweep['storage'].url}/report/report.md"
    assert Path(digits_sweep["url"]).is_file()


def test_clean_ratio_table_has_means_stds_n_and_binomial_error_for_one_seed(digits_sweep: dict[str, Any]) -> None:
    table = table_in(digits_sweep["markdown"], "Clean ratio", "depth=18")
    assert table["header"] == ["clean images kept", "n", "clean", "PGD-5", "PGD-10", "not finished"]
    assert [r["clean images kept"] for r in table["rows"]] == [
        "100% adv + 0% clean (ref)",  # the spec's default clean ratio is the reference, listed first
        "100% adv + 50% clean",
        "100% adv + 100% clean",
    ]
    ref = row(table, "100% adv + 0% clean (ref)")
    assert ref["n"] == "3"
    assert cell(ref["clean"]) == {"mean": 62.0, "std": 2.0, "binomial": None}
    assert cell(ref["PGD-10"]) == {"mean": 31.0, "std": 1.0, "binomial": None}
    half = row(table, "100% adv + 50% clean")
    assert cell(half["PGD-5"]) == {"mean": 41.5, "std": 1.0, "binomial": None}
    # One finished seed: no std; its evaluation subset's binomial error instead (eval.subset 200 images).
    full = row(table, "100% adv + 100% clean")
    assert full["n"] == "1"
    assert cell(full["clean"]) == {"mean": 80.0, "std": None, "binomial": round(100 * binomial_se(0.80, 200), 1)}
    assert full["not finished"] == "1 failed, 1 missing"


def test_comparisons_show_delta_ci_p_test_n_and_verdict(digits_sweep: dict[str, Any]) -> None:
    markdown = digits_sweep["markdown"]
    assert "†" not in markdown and "## How differences are judged" in markdown
    table = table_in(markdown, "Clean ratio", "depth=18", comparisons=True)
    assert table["header"] == ["comparison", "accuracy", "n", "Δ [95% CI]", "p", "test", "the paper", "verdict"]
    label = "100% adv + 50% clean vs 100% adv + 0% clean (ref)"
    for metric, name in (("acc_clean", "clean"), ("acc_pgd_5", "PGD-5"), ("acc_pgd_10", "PGD-10")):
        found = comparison(table, label, name)
        assert (found["Δ [95% CI]"], found["p"]) == welch_text(R50[metric], R0[metric]), name
        assert (found["n"], found["test"]) == ("3 vs 3", "Welch")
    # The paper's finding on robustness (at the strongest attack, PGD-10 here) and on clean accuracy.
    robust = comparison(table, label, "PGD-10")
    assert robust["the paper"] == "removing clean images gains robustness (Section 4.1, Figure 1)"
    assert robust["verdict"].startswith("reproduced")  # -10.0 points, p < 0.05
    assert comparison(table, label, "clean")["verdict"].startswith("reproduced")  # +10.0: clean images help
    weak = comparison(table, label, "PGD-5")  # +0.5: not significant, with what it could have detected
    assert weak["the paper"] == "—"
    assert re.fullmatch(r"no significant difference \(effects below \d+\.\d points undetectable\).*", weak["verdict"])
    # One seed against three: no test, said so.
    single = comparison(table, "100% adv + 100% clean vs 100% adv + 0% clean (ref)", "clean")
    assert (single["n"], single["Δ [95% CI]"], single["p"], single["test"]) == ("1 vs 3", "+18.0", "—", "—")
    assert single["verdict"].startswith("n too small")

    depth = table_in(markdown, "Depth", comparisons=True)
    deeper = comparison(depth, "ResNet-34 vs ResNet-18 (ref)", "PGD-10")
    assert (deeper["Δ [95% CI]"], deeper["p"]) == welch_text(DEPTH34["acc_pgd_10"], R0["acc_pgd_10"])
    assert deeper["the paper"] == "deeper networks are more robust (Section 5, Figure 7)"
    # The findings with a direction are gathered at the top, with the same numbers.
    findings = table_in(markdown, "The paper's findings")
    (top,) = [
        r for r in findings["rows"] if r["comparison"] == "ResNet-34 vs ResNet-18 (ref)" and r["accuracy"] == "PGD-10"
    ]
    assert (top["Δ [95% CI]"], top["verdict"]) == (deeper["Δ [95% CI]"], deeper["verdict"])


def test_normalisation_table_compares_mbn_branches_with_bn_and_with_each_other(digits_sweep: dict[str, Any]) -> None:
    table = table_in(digits_sweep["markdown"], "Normalisation")
    assert "clean_ratio=1" in table["fixed"] and "strategy=mixture" in table["fixed"]
    assert [r["normalisation"] for r in table["rows"]] == ["BN (ref)", "MBN_adv", "MBN_clean"]
    assert cell(row(table, "MBN_adv")["PGD-10"]) == {"mean": 41.0, "std": 1.0, "binomial": None}
    assert row(table, "MBN_adv")["n"] == "3"
    comparisons = table_in(digits_sweep["markdown"], "Normalisation", comparisons=True)
    assert comparison(comparisons, "MBN_adv vs BN (ref)", "PGD-10")["verdict"].startswith("n too small")  # BN: n=1
    # The two branches of one network are paired: PGD-10 differs by -0.35, -0.34, -0.36 per network.
    paired = comparison(comparisons, "MBN_clean vs MBN_adv (same networks)", "PGD-10")
    reference = scipy_stats.ttest_rel(
        [100 * v for v in MBN_CLEAN["acc_pgd_10"]], [100 * v for v in MBN_ADV["acc_pgd_10"]]
    )
    assert (paired["n"], paired["test"], paired["p"]) == ("3 pairs", "paired t", "<0.001")
    assert reference.pvalue < 0.001
    assert paired["verdict"].startswith("reproduced")  # the adversarial branch is the robust one
    # Clean accuracy differs by exactly +0.28 in every network: no variance, no t-test, and no NaN.
    constant = comparison(comparisons, "MBN_clean vs MBN_adv (same networks)", "clean")
    assert (constant["test"], constant["p"], constant["Δ [95% CI]"]) == ("—", "—", "+28.0")
    assert constant["verdict"].startswith("untestable (no variance)")
    assert "nan" not in digits_sweep["markdown"].lower()


def test_only_tables_the_grid_supports_and_a_note_on_the_rest(digits_sweep: dict[str, Any]) -> None:
    markdown = digits_sweep["markdown"]
    sections = {t["section"].split(" (")[0] for t in tables(markdown)}
    assert {"Clean ratio", "Normalisation", "Depth", "Every setting", "Every cell and branch"} <= sections
    for absent in ("Training strategy", "Running statistics in training: BN* vs BN", "PGD-N for training"):
        assert absent not in sections
    lacks = markdown.split("## What this report lacks", 1)[1]
    assert "PGD-N for training (Table 4): no two cells differ only in pgd_steps" in lacks
    assert "Batch size (Table 6)" in lacks and "PGD-2000" in lacks
    assert "paper's numbers are not shown" in markdown and "builtin://digits" in markdown
    assert "↳ paper" not in markdown


def test_every_setting_and_every_cell_are_listed(digits_sweep: dict[str, Any]) -> None:
    markdown = digits_sweep["markdown"]
    settings = table_in(markdown, "Every setting")
    labels = [(r["network"], r["setting"], r["n"]) for r in settings["rows"]]
    assert ("ResNet-18", "MBN_clean, 100% adv + 100% clean", "3") in labels
    assert ("ResNet-34", "100% adv + 0% clean", "3") in labels
    assert len(labels) == 6  # 3 clean ratios, 2 MBN branches, depth 34
    cells = table_in(markdown, "Every cell and branch")
    # 15 cells of the grid: 14 with a record (13 finished, 1 failed), the 3 MBN ones with two branches; the
    # missing one has no row.
    assert len(cells["rows"]) == 14 + 3
    failed = [r for r in cells["rows"] if r["status"] == "failed"]
    assert [r["cell"] for r in failed] == [f"`{digits_sweep['ids']['failed']}`"]


def test_partial_sweep_lists_missing_and_failed_cells(digits_sweep: dict[str, Any]) -> None:
    markdown = digits_sweep["markdown"]
    assert "15 cells: 13 finished, 1 failed, 1 missing" in markdown
    table = table_in(markdown, "Missing and failed cells")
    states = {r["cell"].strip("`"): (r["state"], r["error"]) for r in table["rows"]}
    assert states == {
        digits_sweep["ids"]["missing"]: ("missing", ""),
        digits_sweep["ids"]["failed"]: ("failed", "RuntimeError: boom in epoch 2"),
    }
    assert "seed=1" in row(table, f"`{digits_sweep['ids']['missing']}`")["axes"]


def test_every_figure_is_a_reasonable_png_and_linked(digits_sweep: dict[str, Any]) -> None:
    storage = digits_sweep["storage"]
    folder = Path(storage.path("report"))
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert pngs == ["accuracy_vs_depth.png", "accuracy_vs_pgd.png", "accuracy_vs_pgd_mbn.png", "clean_vs_robust.png"]
    for name in pngs:
        data = (folder / name).read_bytes()
        width, height = png_size(data)
        assert 600 <= width <= 2000 and 400 <= height <= 2000, (name, width, height)
        assert 10_000 < len(data) < 2_000_000, (name, len(data))
        assert f"]({name})" in digits_sweep["markdown"]
    assert not (folder / "stale-figure.png").exists()  # an earlier report's figure is removed


# ------------------------------------------------------------------------------------------------------------
# The paper's numbers, where the workload is the paper's


IMAGENET_WORKLOAD: dict[str, Any] = {
    "data": {"url": "s3://bucket/datasets/imagenet", "eval_split": "val"},
    "model": {"depth": 152, "norm": "bn", "stem": "imagenet", "width": 1.0},
    "attack": {"steps": 30, "eps": 16},
    "training": {"strategy": "mixture", "clean_ratio": 0.0},
    "recipe": {"epochs": 110, "batch_size": 4096, "per_worker_batch": 32},
    "eval": {"pgd_steps": [10, 2000], "subset": 5000},
}


def test_paper_numbers_beside_ours_for_the_paper_setting(tmp_path: Path) -> None:
    grid = [{"clean_ratio": [0.0, 1.0]}, {"strategy": ["alp"], "clean_ratio": [1.0]}, {"norm": ["bn*"]}]
    spec = make_spec(IMAGENET_WORKLOAD, grid)
    records = [record(c, {"main": {"acc_clean": 0.5, "acc_pgd_10": 0.4, "acc_pgd_2000": 0.3}}) for c in expand(spec)]
    storage = write_sweep(str(tmp_path / "paper"), spec, records)
    build_report(storage.url)
    markdown = read_text(storage, "report", "report.md")
    table = table_in(markdown, "Clean ratio")
    rows = table["rows"]
    labels = [r["clean images kept"] for r in rows]
    assert labels == ["100% adv + 0% clean (ref)", "↳ paper", "100% adv + 100% clean", "↳ paper"]
    # Table 7, ResNet-152, batch 4096, PGD-30: 100% adv + 0% clean 62.3 / 52.5 / 39.2; + 100% clean 78.0 / 56.2 / 20.9.
    assert (rows[1]["clean"], rows[1]["PGD-10"], rows[1]["PGD-2000"]) == ("62.3", "52.5", "39.2")
    assert (rows[3]["clean"], rows[3]["PGD-10"], rows[3]["PGD-2000"]) == ("78.0", "56.2", "20.9")
    strategy = table_in(markdown, "Training strategy")
    alp = strategy["rows"][strategy["rows"].index(row(strategy, "100% adv + 100% clean, ALP")) + 1]
    assert (alp["strategy"], alp["clean"], alp["PGD-2000"]) == ("↳ paper", "73.5", "23.0")
    star = table_in(markdown, "Running statistics")
    assert [r["setting"] for r in star["rows"]][2:] == ["100% adv + 0% clean*", "↳ paper"]
    assert star["rows"][3]["PGD-2000"] == "42.2"  # Table 2: 39.2 + 3.0
    assert "paper's numbers are not shown" not in markdown


SEED_TEXT = Path(__file__).resolve().parents[2] / "shared" / "seeds" / "000_4d9cab5cef856b09.txt"
PAPER_COLUMNS = ("acc_clean", *(f"acc_pgd_{n}" for n in report.PAPER_PGD))
NUMBER = re.compile(r"[+-]?\d+\.\d")


@pytest.fixture(scope="module")
def paper_text() -> str:
    if not SEED_TEXT.is_file():
        pytest.skip(f"the paper's text is not at {SEED_TEXT}")
    return SEED_TEXT.read_text()


def printed_setting(label: str) -> tuple[str, str, str, float]:
    """(norm, branch, strategy, clean ratio) of a setting as the paper's text prints it, e.g.
    'MBN <sub>adv</sub> , 100% adv + 100% clean, ALP*'."""
    text = re.sub(r"MBN\s*<sub>(adv|clean)</sub>\s*,", r"MBN_\1,", label).strip()
    match = re.fullmatch(r"(?:(MBN_adv|MBN_clean|GN), )?100% adv \+ (\d+)% clean(, ALP)?(\*?)", text)
    assert match, f"not a setting of the paper: {label!r}"
    prefix, ratio, alp, star = match.groups()
    norm = {"MBN_adv": "mbn", "MBN_clean": "mbn", "GN": "gn"}.get(prefix, "bn") + star
    branch = {"MBN_adv": "mbn_adv", "MBN_clean": "mbn_clean"}.get(prefix, "main")
    return norm, branch, "alp" if alp else "mixture", int(ratio) / 100


def paper_table7(text: str) -> dict[report.SettingKey, dict[str, float]]:
    """Table 7 (Appendix C) as the text prints it, one entry per row. Each line holds network, batch size, PGD-N,
    setting, then clean, PGD-10, 20, 100, 500, 2000; merged cells are printed on one row of their block only (or
    garbled), so the blocks are told apart by their layout: four PGD-N blocks in Table 4's order (30, 20, 10, 5),
    each opening with '100% adv + 100% clean, ALP', then the batch-size rows and the depth rows, both
    '100% adv + 0% clean*' at PGD-30 (Table 6, Section 5)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("network\tbatch"))
    end = next(i for i, line in enumerate(lines) if line.startswith("Table 7:"))
    rows = [line.rstrip("\t").split("\t") for line in lines[start:end]]
    rows = [r for r in rows if len(r) == 10 and all(NUMBER.fullmatch(v) for v in r[4:])]
    assert len(rows) == 45, f"Table 7 has 45 rows of numbers, parsed {len(rows)}"
    opens = [i for i, r in enumerate(rows) if r[3] == "100% adv + 100% clean, ALP"]
    assert len(opens) == 4, opens
    size = opens[2] - opens[1]  # the PGD-20, 10 and 5 blocks have the same 8 settings
    blocks = {30: rows[opens[0] : opens[1]], 20: rows[opens[1] : opens[2]], 10: rows[opens[2] : opens[3]]}
    blocks[5] = rows[opens[3] : opens[3] + size]
    table: dict[report.SettingKey, dict[str, float]] = {}

    def put(key: report.SettingKey, values: list[str]) -> None:
        assert key not in table, f"two rows of Table 7 parse to {key}"
        table[key] = dict(zip(PAPER_COLUMNS, map(float, values), strict=True))

    for steps, block in blocks.items():
        for r in block:
            norm, branch, strategy, ratio = printed_setting(r[3])
            put(report.SettingKey(152, 4096, steps, strategy, ratio, norm, branch), r[4:])
    tail = rows[opens[3] + size :]
    assert [printed_setting(r[3]) for r in tail if r[3].startswith("100% adv")] == [("bn*", "main", "mixture", 0.0)]
    for r in tail:
        network = re.match(r"ResNet-(\d+)", r[0])
        if network:
            depth, batch = int(network[1]), 4096
        else:
            # The text prints 8196 where Table 6 and Appendix B.3 say 8192.
            depth, batch = 152, {8196: 8192}.get(int(r[1].split()[0]), int(r[1].split()[0]))
        put(report.SettingKey(depth, batch, 30, "mixture", 0.0, "bn*", "main"), r[4:])
    return table


def paper_table1_clean(text: str) -> dict[report.SettingKey, dict[str, float]]:
    """Table 1's clean image accuracies: standard training's absolute number, the MBN_clean rows as differences
    from it, at PGD-30 for training like the rest of the main paper."""
    lines = text.splitlines()
    start = lines.index("training strategy\tclean image accuracy (%)") + 1
    printed: dict[str, float] = {}
    for line in lines[start:]:
        label, _, value = line.rpartition("\t")
        if not NUMBER.fullmatch(value):
            break
        printed[re.sub(r"MBN\s*<sub>clean</sub>\s*,", "MBN_clean,", label)] = float(value)
    standard = printed.pop("0% adv + 100% clean")
    table = {report.SettingKey(152, 4096, 0, "standard", 1.0, "bn", "main"): {"acc_clean": standard}}
    for label, delta in printed.items():
        norm, branch, strategy, ratio = printed_setting(label)
        key = report.SettingKey(152, 4096, 30, strategy, ratio, norm, branch)
        table[key] = {"acc_clean": round(standard + delta, 1)}
    assert len(table) == 3, printed
    return table


def paper_mismatches(paper: dict[report.SettingKey, dict[str, float]], text: str) -> list[str]:
    """Every entry of `paper` that is not its own row of Table 7 or Table 1, number for number and column for
    column; and every row of those tables that `paper` lacks."""
    table7, table1 = paper_table7(text), paper_table1_clean(text)
    problems = []
    for key, values in sorted(paper.items()):
        want = table7.get(key) or table1.get(key)
        if want is None:
            problems.append(f"{key}: no row of Table 7 or Table 1 has this setting")
        elif values != want:
            problems.append(f"{key}: {values}, but its row in the paper says {want}")
    problems += [f"{key}: Table 7's row is missing" for key in sorted(table7.keys() - paper.keys())]
    problems += [f"{key}: Table 1's row is missing" for key in sorted(table1.keys() - paper.keys())]
    return problems


def test_paper_numbers_are_their_own_table_rows(paper_text: str) -> None:
    assert paper_mismatches(report.PAPER, paper_text) == []
    assert len(paper_table7(paper_text)) + len(paper_table1_clean(paper_text)) == len(report.PAPER) == 45 + 3


def test_a_paper_number_moved_to_another_row_or_column_is_caught(paper_text: str) -> None:
    def key(steps: int, norm: str = "bn", ratio: float = 0.0) -> report.SettingKey:
        return report.SettingKey(152, 4096, steps, "mixture", ratio, norm, "main")

    paper = {k: dict(v) for k, v in report.PAPER.items()}
    # PGD-2000 of 100% adv + 0% clean at PGD-30 and PGD-20 training swapped: both numbers are in the text.
    a, b = key(30), key(20)
    paper[a]["acc_pgd_2000"], paper[b]["acc_pgd_2000"] = paper[b]["acc_pgd_2000"], paper[a]["acc_pgd_2000"]
    # Two columns of one row swapped.
    c = key(10, "bn*")
    paper[c]["acc_pgd_10"], paper[c]["acc_pgd_20"] = paper[c]["acc_pgd_20"], paper[c]["acc_pgd_10"]
    printed = set(NUMBER.findall(paper_text))
    assert all(f"{v:.1f}" in printed for k in (a, b, c) for v in paper[k].values())  # a bag of numbers misses it
    problems = paper_mismatches(paper, paper_text)
    assert [p.split(":")[0] for p in problems] == [str(k) for k in sorted([a, b, c])]
    # A whole row under another setting's key: the row it left is missing and the key it took is wrong.
    paper = {k: dict(v) for k, v in report.PAPER.items()}
    paper[key(5, ratio=1.0)] = paper.pop(key(5))
    problems = paper_mismatches(paper, paper_text)
    assert len(problems) == 2 and any("Table 7's row is missing" in p for p in problems)


# ------------------------------------------------------------------------------------------------------------
# Storage variants


def test_cells_finished_after_results_parquet_and_no_parquet_at_all(tmp_path: Path) -> None:
    spec = make_spec(DIGITS_WORKLOAD, [{"clean_ratio": [0.0, 1.0], "seed": [0, 1]}])
    cells = expand(spec)
    storage = write_sweep(str(tmp_path / "live"), spec, [record(cells[0], {"main": values_at(R0, 0)})])
    # A second cell finished after the driver aggregated: its result.json is read from cells/.
    storage.write_json(storage.cell_path(cells[1].cell_id, "result.json"), record(cells[1], {"main": values_at(R0, 1)}))
    build_report(storage.url)
    markdown = read_text(storage, "report", "report.md")
    assert "4 cells: 2 finished, 0 failed, 2 missing" in markdown
    assert "1 cell record(s) newer than results.parquet" in markdown
    ref = row(table_in(markdown, "Clean ratio"), "100% adv + 0% clean (ref)")
    assert ref["n"] == "2" and cell(ref["clean"])["mean"] == 61.0

    storage.remove(storage.path("results.parquet"))
    build_report(storage.url)
    markdown = read_text(storage, "report", "report.md")
    assert "4 cells: 1 finished, 0 failed, 3 missing" in markdown


def test_report_on_s3(s3_bucket: str) -> None:
    spec = make_spec(DIGITS_WORKLOAD, [{"clean_ratio": [0.0, 0.5], "seed": SEEDS}])
    records = [
        record(c, {"main": values_at(R0 if c.axes["clean_ratio"] == 0.0 else R50, c.axes["seed"])})
        for c in expand(spec)
    ]
    storage = write_sweep(f"{s3_bucket}/sweeps/rep", spec, records)
    url = build_report(storage.url)
    assert url == f"{s3_bucket}/sweeps/rep/report/report.md"
    fs, root = open_fs(f"{s3_bucket}/sweeps/rep/report")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    assert names == ["accuracy_vs_pgd.png", "clean_vs_robust.png", "report.md"]
    png_size(fs.cat_file(f"{root}/accuracy_vs_pgd.png"))
    markdown = fs.cat_file(f"{root}/report.md").decode()
    half = row(table_in(markdown, "Clean ratio"), "100% adv + 50% clean")
    assert cell(half["clean"]) == {"mean": 72.0, "std": 2.0, "binomial": None}
    found = comparison(
        table_in(markdown, "Clean ratio", comparisons=True),
        f"{half['clean images kept']} vs 100% adv + 0% clean (ref)",
        "clean",
    )
    assert found["Δ [95% CI]"] == welch_text(R50["acc_clean"], R0["acc_clean"])[0]


def test_cli_writes_the_report_and_exits_2_without_a_sweep(
    digits_sweep: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert report.main([digits_sweep["storage"].url]) == 0
    assert capsys.readouterr().out.strip() == digits_sweep["url"]
    assert report.main([str(tmp_path / "nothing-here")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no sweep at") and err.count("\n") == 1


# ------------------------------------------------------------------------------------------------------------
# Pairing: BN and BN* of one seed


def test_bn_star_against_bn_is_paired_by_seed(tmp_path: Path) -> None:
    spec = make_spec(DIGITS_WORKLOAD, [{"norm": ["bn", "bn*"], "seed": [0, 1, 2, 3, 4]}])
    # Seeds spread by several points; BN* is about 1 point above BN of the same seed, every time.
    bn = [0.172, 0.215, 0.146, 0.121, 0.198]
    star = [v + d for v, d in zip(bn, [0.006, 0.014, 0.008, 0.012, 0.010], strict=True)]
    records = [
        record(
            c,
            {
                "main": {
                    "acc_clean": 0.6,
                    "acc_pgd_5": 0.3,
                    "acc_pgd_10": (star if c.axes["norm"] == "bn*" else bn)[c.axes["seed"]],
                }
            },
        )
        for c in expand(spec)
    ]
    storage = write_sweep(str(tmp_path / "star"), spec, records)
    build_report(storage.url)
    markdown = read_text(storage, "report", "report.md")
    found = comparison(
        table_in(markdown, "Running statistics", comparisons=True),
        "100% adv + 0% clean* vs 100% adv + 0% clean (ref)",
        "PGD-10",
    )
    reference = scipy_stats.ttest_rel([100 * v for v in star], [100 * v for v in bn])
    assert (found["n"], found["test"], found["p"]) == ("5 pairs", "paired t", f"{reference.pvalue:.3f}")
    # Table 2: running statistics add robustness. (The digits evaluation's PGD-10, step 1, cannot reach eps 16.)
    assert found["verdict"] == "reproduced ⚠ PGD-10 cannot reach eps"
    # Unpaired, the seed-to-seed spread would hide it: the pairing is what makes it significant.
    assert scipy_stats.ttest_ind(star, bn, equal_var=False).pvalue > 0.5 and reference.pvalue < 0.05
    # Clean accuracy is identical in every seed: said so, no NaN.
    same = comparison(
        table_in(markdown, "Running statistics", comparisons=True),
        "100% adv + 0% clean* vs 100% adv + 0% clean (ref)",
        "clean",
    )
    assert same["verdict"] == "no difference (identical in every seed)"


# ------------------------------------------------------------------------------------------------------------
# Training health


def history(cell_id: str, loss: list[float], adv: list[float], lr: list[float]) -> list[dict[str, Any]]:
    rows = zip(loss, adv, lr, strict=True)
    return [
        {"cell_id": cell_id, "epoch": e, "loss": value, "train_acc_adv": a, "train_acc_clean": None, "lr": r}
        for e, (value, a, r) in enumerate(rows, start=1)
    ]


LR = [0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001]  # decays at epochs 4 and 7


def test_stuck_seed_is_flagged_and_a_healthy_one_not() -> None:
    flat_loss = [2.3, 2.0, 1.9, 1.85, 1.84, 1.84, 1.84]
    rows = history("stuck", flat_loss, [0.10, 0.11, 0.12, 0.14, 0.15, 0.19, 0.18], LR)
    rows += history("healthy", flat_loss, [0.10, 0.11, 0.12, 0.14, 0.15, 0.21, 0.18], LR)
    rows += history("early", flat_loss[:3], [0.10, 0.10, 0.10], LR[:3])  # not past its first decay: not judged
    flags = health.stuck_seeds(rows, num_classes=10)
    assert [(f.cell_id, f.epoch) for f in flags] == [("stuck", 4)]
    assert "19.0 % < 20.0 %" in flags[0].detail and "adversarial" in flags[0].detail
    assert health.stuck_seeds(rows, num_classes=1000) == []  # 2 x chance is 0.2 % at 1000 classes


def test_loss_still_falling_at_a_decay_is_flagged() -> None:
    # Falling 20 % per epoch into the decay at epoch 4; flat before epoch 7, except that epoch 4 itself (the
    # first at the lower LR) drops, which is the first decay's doing and must not count.
    falling = history("falling", [2.0, 1.6, 1.28, 0.70, 0.70, 0.70, 0.69], [0.5] * 7, LR)
    settled = history("settled", [2.0, 1.99, 1.98, 1.97, 1.97, 1.97, 1.96], [0.5] * 7, LR)
    flags = health.loss_falling_at_decays(falling + settled)
    assert [(f.cell_id, f.epoch) for f in flags] == [("falling", 4)]
    # Least-squares slope through 2.0, 1.6, 1.28: -0.36 per epoch, relative to their mean.
    assert flags[0].value == pytest.approx(0.36 / ((2.0 + 1.6 + 1.28) / 3))
    assert health.relative_drop_per_epoch([(1, 1.0)]) is None


def test_evaluation_attack_short_of_eps_is_flagged() -> None:
    spec_eval = {"pgd_steps": [10, 16, 200], "eps": 16.0, "step_size": 1.0}
    flags = health.attack_short_of_eps(
        {None: spec_eval, "same": dict(spec_eval), "other": {**spec_eval, "step_size": 0.1}}
    )
    assert [(f.cell_id, f.metric) for f in flags] == [
        (None, "acc_pgd_10"),
        ("other", "acc_pgd_10"),
        ("other", "acc_pgd_16"),
    ]
    assert flags[0].detail == "PGD-10 with step 1 moves a pixel at most 10 < eps 16"
    assert health.note(flags, ["a", "b"], "acc_pgd_10") == "PGD-10 cannot reach eps"
    assert health.note(flags, ["a", "b"], "acc_pgd_200") == ""


def test_report_shows_health_flags_and_marks_verdicts_resting_on_them(tmp_path: Path) -> None:
    spec = make_spec(DIGITS_WORKLOAD, [{"clean_ratio": [0.0, 1.0], "seed": [0, 1, 2]}])
    storage = SweepStorage(str(tmp_path / "health"))
    # The bundled dataset as the sweep converts it into its storage: 10 classes, 150 test images.
    meta = {"num_classes": 10, "splits": {"test": {"num_images": 150}, "train": {"num_images": 1000}}}
    storage.write_json(storage.path("datasets", "digits", "meta.json"), meta)
    stuck = None
    for cell_ in expand(spec):
        adv = (
            [0.1, 0.12, 0.13, 0.14]
            if cell_.axes == {**cell_.axes, "clean_ratio": 1.0, "seed": 2}
            else [0.3, 0.6, 0.8, 0.9]
        )
        stuck = cell_.cell_id if adv[-1] < 0.2 else stuck
        epochs = [
            {
                "epoch": e,
                "loss": 1.0,
                "train_acc_adv": a,
                "train_acc_clean": None,
                "lr": lr,
                "images_per_sec": 1.0,
                "epoch_seconds": 1.0,
            }
            for e, (a, lr) in enumerate(zip(adv, [0.1, 0.1, 0.01, 0.01], strict=True), start=1)
        ]
        storage.write_json(
            storage.cell_path(cell_.cell_id, "history.json"),
            {"cell_id": cell_.cell_id, "axes": cell_.axes, "epochs": epochs},
        )
    records = [
        record(c, {"main": values_at(R0 if c.axes["clean_ratio"] == 0.0 else R50, c.axes["seed"])})
        for c in expand(spec)
    ]
    write_sweep(storage.url, spec, records)
    build_report(storage.url)
    markdown = read_text(storage, "report", "report.md")
    section = markdown.split("## Training health", 1)[1].split("\n## ", 1)[0]
    stuck_table = [t for t in tables(markdown) if t["section"] == "Training health" and t["header"][0] == "cell"][0]
    assert [r["cell"] for r in stuck_table["rows"]] == [f"`{stuck}`"]
    assert "PGD-5 with step 1 moves a pixel at most 5 < eps 16" in section  # the digits eval: step 1, eps 16
    comparisons = table_in(markdown, "Clean ratio", comparisons=True)
    label = "100% adv + 100% clean vs 100% adv + 0% clean (ref)"
    assert comparison(comparisons, label, "clean")["verdict"].endswith("⚠ stuck in 1 of 6 cells")
    assert comparison(comparisons, label, "PGD-5")["verdict"].endswith(
        "⚠ stuck in 1 of 6 cells; PGD-5 cannot reach eps"
    )
    # The per-cell binomial error uses the evaluated images: eval.subset 200 capped by the 150 test images.
    cells = table_in(markdown, "Every cell and branch")
    assert cells["rows"][0]["clean"].endswith(
        f"± {100 * binomial_se(float(cells['rows'][0]['clean'].split()[0]) / 100, 150):.1f}"
    )
    assert "150 evaluation images" in markdown
