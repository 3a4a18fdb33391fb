"""Training-health flags: reasons to distrust a cell's numbers before comparing them, from the sweep's per-epoch
history (history.parquet rows: cell_id, epoch, loss, train_acc_adv, train_acc_clean, lr, ...) and the
evaluation attack's configuration.

- stuck: after the first LR decay, the cell's accuracy on its adversarial (or clean) training batches never
  reaches STUCK_FACTOR x chance (2/K for K classes: 20 % on digits, 0.2 % on ImageNet). Chance-level accuracy
  fluctuates around 1/K; a network still below twice that once the LR has dropped by 10x (Section 3's schedule)
  has not learned that kind of image, and its evaluation measures a failed run rather than the setting.
- loss still falling at an LR decay: over the LOSS_WINDOW epochs before a decay, the training loss falls by more
  than LOSS_FALLING of its level per epoch (least-squares slope over the window, relative to its mean; the first
  epoch at the previous LR is left out, as its drop is that decay's doing). The
  paper's schedule decays after long plateaus (epochs 35, 70, 95 of 110); a decay that lands on a steep loss
  freezes a model that had not converged at that LR, so a short recipe may understate what a setting can reach.
- attack short of eps: an evaluation PGD-N whose N x step size is below eps cannot move a pixel across the
  eps-box from its random start (the paper evaluates with step 1 and eps 16, so PGD-10 is short); its accuracy
  overstates robustness, and a comparison under it measures the attack's reach as much as the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from workloads import metrics as metric_names

STUCK_FACTOR = 2.0  # x chance accuracy (1/K)
LOSS_WINDOW = 3  # epochs before a decay
LOSS_FALLING = 0.05  # relative drop of the training loss per epoch

Kind = Literal["stuck", "loss falling", "attack short of eps"]


@dataclass(frozen=True)
class Flag:
    kind: Kind
    cell_id: str | None  # None: every cell evaluated with that attack
    detail: str
    epoch: int | None = None  # the LR decay it concerns
    metric: str | None = None  # the accuracy it concerns (acc_pgd_<N>), for an attack flag
    value: float | None = None  # the measured quantity: best accuracy, loss drop per epoch


def _by_cell(history: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    cells: dict[str, list[Mapping[str, Any]]] = {}
    for row in history:
        cells.setdefault(str(row["cell_id"]), []).append(row)
    return {cid: sorted(rows, key=lambda r: int(r["epoch"])) for cid, rows in cells.items()}


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(value)


def lr_decays(rows: list[Mapping[str, Any]]) -> list[int]:
    """Epochs trained at a lower learning rate than the epoch before (a warm-up's rise is not a decay)."""
    decays = []
    for before, row in zip(rows, rows[1:], strict=False):
        if _finite(before.get("lr")) and _finite(row.get("lr")) and row["lr"] < before["lr"] * (1 - 1e-9):
            decays.append(int(row["epoch"]))
    return decays


def stuck_seeds(history: Iterable[Mapping[str, Any]], num_classes: int) -> list[Flag]:
    threshold = STUCK_FACTOR / num_classes
    flags = []
    for cell_id, rows in _by_cell(history).items():
        decays = lr_decays(rows)
        if not decays:  # not past its first decay yet (or a constant LR): too early to call
            continue
        after = [r for r in rows if int(r["epoch"]) >= decays[0]]
        for metric, images in (("train_acc_adv", "adversarial"), ("train_acc_clean", "clean")):
            values = [float(r[metric]) for r in after if _finite(r.get(metric))]
            if values and max(values) < threshold:
                detail = (
                    f"best accuracy on {images} training images from epoch {decays[0]} (first LR decay) on: "
                    f"{100 * max(values):.1f} % < {100 * threshold:.1f} % ({STUCK_FACTOR:g} x chance, "
                    f"{num_classes} classes)"
                )
                flags.append(Flag("stuck", cell_id, detail, epoch=decays[0], value=max(values)))
    return flags


def loss_falling_at_decays(history: Iterable[Mapping[str, Any]]) -> list[Flag]:
    flags = []
    for cell_id, rows in _by_cell(history).items():
        decays = lr_decays(rows)
        for previous, decay in zip([0, *decays], decays, strict=False):
            # The epochs before the decay, none of them the first at the previous LR: a loss that drops because
            # the LR just dropped is the previous decay's doing, not a sign of an unconverged model.
            start = max(decay - LOSS_WINDOW, previous + 1 if previous else 0)
            window = [
                (int(r["epoch"]), float(r["loss"]))
                for r in rows
                if start <= int(r["epoch"]) < decay and _finite(r.get("loss"))
            ]
            drop = relative_drop_per_epoch(window)
            if drop is not None and drop > LOSS_FALLING:
                first, last = window[0][0], window[-1][0]
                detail = f"loss fell {100 * drop:.0f} % per epoch over epochs {first}-{last}, before the LR decay"
                flags.append(Flag("loss falling", cell_id, f"{detail} at epoch {decay}", epoch=decay, value=drop))
    return flags


def relative_drop_per_epoch(points: list[tuple[int, float]]) -> float | None:
    """-slope / mean of a least-squares line through (epoch, loss); None for fewer than 2 points or a mean <= 0."""
    if len(points) < 2:
        return None
    xs, ys = [float(x) for x, _ in points], [y for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mx) ** 2 for x in xs)
    if spread == 0 or my <= 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / spread
    return -slope / my


def attack_short_of_eps(evals: Mapping[str | None, Mapping[str, Any]]) -> list[Flag]:
    """`evals`: cell id (None: the spec's, for every cell) -> an evaluation config (pgd_steps, eps, step_size,
    as in workloads.config.EvalConfig). One flag per PGD-N and config that cannot reach eps; cells whose config
    equals the spec's are covered by its flag."""
    flags = []
    shared = evals.get(None)
    for cell_id, config in evals.items():
        if cell_id is not None and shared is not None and _attack(config) == _attack(shared):
            continue
        eps, step = float(config["eps"]), float(config["step_size"])
        for steps in config.get("pgd_steps") or ():
            if steps * step < eps:
                detail = f"PGD-{steps} with step {step:g} moves a pixel at most {steps * step:g} < eps {eps:g}"
                flags.append(Flag("attack short of eps", cell_id, detail, metric=metric_names.pgd_metric(steps)))
    return flags


def _attack(config: Mapping[str, Any]) -> tuple[Any, ...]:
    return (float(config["eps"]), float(config["step_size"]), tuple(config.get("pgd_steps") or ()))


def note(flags: Iterable[Flag], cell_ids: Iterable[str], metric: str) -> str:
    """What a comparison of these cells on `metric` rests on that is flagged, in a few words; "" when nothing."""
    cells = set(cell_ids)
    flags = list(flags)
    parts = []
    for kind, words in (("stuck", "stuck"), ("loss falling", "loss still falling at an LR decay")):
        hit = {f.cell_id for f in flags if f.kind == kind and f.cell_id in cells}
        if hit:
            parts.append(f"{words} in {len(hit)} of {len(cells)} cells")
    short = [f for f in flags if f.kind == "attack short of eps" and f.metric == metric]
    if any(f.cell_id is None or f.cell_id in cells for f in short):
        parts.append(f"{metric_names.metric_label(metric)} cannot reach eps")
    return "; ".join(parts)
