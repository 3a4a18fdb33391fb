"""Typed configuration of one training cell.

This module imports neither torch nor ray, so the orchestrator can validate and plan a sweep without either.
Every field is bounded; a bad value fails with pydantic's message, which names the field path and what is allowed.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from workloads.augment import AugmentConfig
from workloads.builtin_data import check_builtin

# ResNet depths as data: depth -> (block type, blocks per stage). 18..200 are the standard He et al. layouts
# (200 from He et al. 2016b). The paper's deep variants (Section 5, Figure 7) give no split; we keep ResNet-152's
# first, second and last stage and grow only the third stage, as ResNet-101/152/200 do:
# 338 = 3*(3+24+82+3)+2 = 338 and 638 = 3*(3+24+182+3)+2 = 638 layers.
RESNET_STAGES: dict[int, tuple[Literal["basic", "bottleneck"], tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
    338: ("bottleneck", (3, 24, 82, 3)),
    638: ("bottleneck", (3, 24, 182, 3)),
}

# The names below are the single source: the spec's grid values and the model's norm layers derive from them.
# "mbn" is mixture BN (Section 4.2): separate BN statistics for adversarial and clean images.
Norm = Literal["bn", "mbn", "gn"]
NORMS: tuple[str, ...] = get_args(Norm)
# Norms with BN running statistics: the ones BN* (Section 4.3) applies to ("bn*", "mbn*" in a grid).
RUNNING_STATS_NORMS: tuple[str, ...] = ("bn", "mbn")
Strategy = Literal["mixture", "alp", "standard"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
MAX_SEED = 2**31 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    depth: int = 152
    norm: Norm = "bn"
    # BN*: for the last `bn_star_epochs` epochs BN uses its running statistics in training too (Section 4.3,
    # Table 2: paper uses 10 of 110). 0 turns it off. Ignored by GN, which has no running statistics.
    bn_star_epochs: int = Field(0, ge=0)
    width: float = Field(1.0, gt=0, le=8)
    # "imagenet": 7x7/2 conv + max-pool (224px inputs). "small": 3x3/1 conv, no pool (32px inputs, CPU runs).
    stem: Literal["imagenet", "small"] = "imagenet"
    # GN groups at width 1 (the paper's 32, Section 4.2); a narrower network has proportionally fewer, so each layer
    # keeps the full-width network's channels per group (models.gn_groups_at_width).
    gn_groups: int = Field(32, ge=1)

    @field_validator("depth")
    @classmethod
    def _known_depth(cls, depth: int) -> int:
        if depth not in RESNET_STAGES:
            allowed = ", ".join(str(d) for d in RESNET_STAGES)
            raise ValueError(f"{depth} is not one of {allowed}")
        return depth


class AttackConfig(_Strict):
    """Targeted L-inf PGD for training (Section 3: eps 16, step 1, N 30 on the 0-255 pixel scale)."""

    steps: int = Field(30, ge=0, le=10000)
    eps: float = Field(16.0, gt=0, le=255)
    # None: derived from steps as in the paper (Appendix B.1 footnote 6: step 4 for PGD-5, 2 for PGD-10, else 1).
    step_size: float | None = Field(None, gt=0, le=255)
    clean_start_prob: float = Field(0.2, ge=0, le=1)
    # The pipeline's step rule (ImageNet-Adversarial-Training, adv_model.py, PGDAttacker.__init__:
    # `step_size = max(step_size, epsilon / num_iter)`): the step is at least eps/N, so N steps can cover the
    # eps-ball. At eps 16 it changes none of the paper's N (5, 10, 20, 30 give 4, 2, 1, 1 either way); it lifts
    # short attacks, e.g. PGD-1 from step 4 to 16 and PGD-12 from 1 to 4/3. False: the step as derived or set.
    reach_eps: bool = True

    @property
    def resolved_step_size(self) -> float:
        return attack_step_size(self.steps, self.eps, self.step_size, reach_eps=self.reach_eps)


def paper_step_size(steps: int) -> float:
    """PGD step size on the 0-255 scale for N steps (Appendix B.1, footnote 6)."""
    if steps <= 5:
        return 4.0
    if steps <= 10:
        return 2.0
    return 1.0


def attack_step_size(steps: int, eps: float, step_size: float | None = None, *, reach_eps: bool = True) -> float:
    """The training attack's step on the 0-255 scale: `step_size`, or the paper's for N steps when None
    (footnote 6), raised to eps/N when `reach_eps` (the pipeline's adv_model.py, PGDAttacker)."""
    step = step_size if step_size is not None else paper_step_size(steps)
    if reach_eps and steps > 0:
        step = max(step, eps / steps)
    return step


class TrainingConfig(_Strict):
    # "mixture": Eq. 1 over [adversarial; kept clean]; "alp": mixture plus adversarial logit pairing
    # (Kannan et al. 2018); "standard": clean images only, no attack (the paper's "0% adv + 100% clean").
    strategy: Strategy = "mixture"
    # Fraction of clean counterparts kept in each batch (Section 4.1: 100, 80, ..., 0 %).
    clean_ratio: float = Field(0.0, ge=0, le=1)
    alp_weight: float = Field(0.5, ge=0)


class RecipeConfig(_Strict):
    """Section 3: momentum SGD, 110 epochs, LR /10 at epochs 35, 70, 95, batch 4096 on 128 GPUs (32 per GPU).

    The paper trains with "the publicly available adversarial training pipeline" (Section 3, footnote 1:
    facebookresearch/ImageNet-Adversarial-Training); where the paper is silent, the defaults are that pipeline's,
    each citing the pipeline file it comes from. The recipe before them is nesterov false, label_smoothing 0,
    weight_decay_on "all", warmup_epochs 0 (and AttackConfig.reach_eps false).
    """

    epochs: int = Field(110, ge=1, le=10000)
    batch_size: int = Field(4096, ge=1)
    per_worker_batch: int = Field(32, ge=1)
    # Linear scaling rule (Goyal et al. 2017), which the paper's pipeline follows: lr = base_lr * batch / 256.
    base_lr: float = Field(0.1, gt=0)
    lr_reference_batch: int = Field(256, ge=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    # Nesterov momentum: the pipeline's optimizer is `tf.train.MomentumOptimizer(lr, 0.9, use_nesterov=True)`
    # (third_party/imagenet_utils.py, ImageNetModel.optimizer); torch's SGD(nesterov=True) is the same update.
    nesterov: bool = True
    weight_decay: float = Field(1e-4, ge=0)
    # Which parameters weight decay applies to. The pipeline decays the variables matching
    # `weight_decay_pattern = '.*/W'` (third_party/imagenet_utils.py): conv and fc weights, not the BN/GN scale
    # and shift nor the fc bias. "all": every parameter (torch's SGD weight_decay on model.parameters()).
    weight_decay_on: Literal["all", "conv_fc_weights"] = "conv_fc_weights"
    # Label smoothing of the training loss: the pipeline's `AdvImageNetModel.label_smoothing = 0.1` (adv_model.py),
    # applied in its cross-entropy like F.cross_entropy(label_smoothing=...). Evaluation counts accuracy only.
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    # Gradual warm-up (Goyal et al. 2017, Sec. 2.2), as the pipeline's main.py (do_train) does it: when the scaled
    # LR exceeds `warmup_start_lr`, the LR rises linearly per step from `warmup_start_lr` to the scaled LR over the
    # first `warmup_epochs` epochs (main.py: 0.1 to BASE_LR over 5 epochs, step-based, only if BASE_LR > 0.1).
    # 0 epochs: no warm-up.
    warmup_epochs: int = Field(5, ge=0)
    warmup_start_lr: float = Field(0.1, ge=0)
    # Decay points as fractions of the run, so shorter runs keep the paper's 35/70/95-of-110 shape.
    lr_decay_at: tuple[float, ...] = (35 / 110, 70 / 110, 95 / 110)

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / self.lr_reference_batch

    def lr_milestones(self) -> list[int]:
        """Epochs at which the LR drops /10. A list, not a set: in a short run two decay points can round to the
        same epoch, and both decays must happen so the run ends at the paper's final LR (lr/1000)."""
        epochs = (round(f * self.epochs) for f in self.lr_decay_at)
        return sorted(max(1, e) for e in epochs if e < self.epochs)

    def warms_up(self) -> bool:
        """Whether the run starts with a warm-up: only when the scaled LR exceeds the start (main.py: the pipeline
        warms up only if BASE_LR > 0.1, i.e. for batches above 256)."""
        return self.warmup_epochs > 0 and self.lr > self.warmup_start_lr

    @field_validator("lr_decay_at")
    @classmethod
    def _fractions(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < f < 1 for f in v):
            raise ValueError("every decay point must be a fraction of the run in (0, 1)")
        return v

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> RecipeConfig:
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0 (set nesterov: false for plain SGD)")
        return self


class EvalConfig(_Strict):
    """Section 3 'Evaluation': targeted PGD with random start inside the eps-cube, eps 16, step 1."""

    pgd_steps: tuple[int, ...] = (10, 20, 100, 500, 2000)
    eps: float = Field(16.0, gt=0, le=255)
    step_size: float = Field(1.0, gt=0, le=255)
    # False: untargeted PGD (maximise the loss on the label), a sanity check beside the paper's targeted attack.
    targeted: bool = True
    # Fixed subset of the eval split (first n images), fixed seed: every cell is attacked identically.
    subset: int = Field(1000, ge=1)
    batch_size: int = Field(100, ge=1)
    seed: int = 0
    # True: one attack per eval batch, run to the largest N, read at every N. PGD-k from the same random start is the
    # first k steps of PGD-K (K > k), so the curve costs its longest attack alone (max N steps, not the sum over N).
    # Each N is then still PGD-N from a random start, but every N shares that start. False: a separate attack per N
    # from a start of its own (the evaluation before this option).
    trajectory: bool = False
    # Random starts per image: it counts as robust at N only if it survives all of them (the worst case over
    # restarts, the usual robustness evaluation; Section 3 uses one). The first start is the one-start evaluation's.
    restarts: int = Field(1, ge=1, le=100)

    @field_validator("pgd_steps")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(n < 1 for n in v):
            raise ValueError("PGD steps must be >= 1")
        return tuple(sorted(set(v)))

    def unreachable_steps(self) -> tuple[int, ...]:
        """The PGD step counts N of `pgd_steps` with N x step_size < eps: such an attack cannot move an image the
        whole eps from where it starts (e.g. PGD-10 at the paper's step 1 and eps 16 moves at most 10). The
        pipeline's PGDAttacker, which its evaluation runs too, lifts such a step to eps/N (adv_model.py); this
        config's step_size is used as given."""
        # A relative tolerance, so N x (eps / N) counts as reaching eps despite rounding.
        return tuple(n for n in self.pgd_steps if n * self.step_size < self.eps * (1 - 1e-9))


class DataConfig(_Strict):
    # Root of a sharded Parquet dataset (see workloads.data): local path, file:// or s3://.
    url: str = Field(min_length=1)
    train_split: str = "train"
    eval_split: str = "test"
    # Shuffle buffer in images for the streaming reader; 0 reads shards in order.
    shuffle_buffer: int = Field(2048, ge=0)
    # Training-image transform (workloads/augment.py): "auto" is the paper's pipeline on encoded (ImageNet) data
    # and none on decoded (digits, synthetic) data; "paper", "crop_flip" (small stem) and "none" choose explicitly.
    augment: AugmentConfig = AugmentConfig()

    @field_validator("url")
    @classmethod
    def _not_blank(cls, url: str) -> str:
        if not url.strip():
            raise ValueError("a data URL is required (local path, file:// or s3://)")
        check_builtin(url)  # a typo in builtin://... fails at validation, not once Ray is up
        return url


class PerformanceConfig(_Strict):
    """How a cell's arithmetic runs on its device. Neither option changes the recipe; precision changes rounding.

    precision: "fp32" is the IEEE reference (on CUDA, TF32 tensor cores are switched off too); "bf16" runs the
    forward passes of training and of the attack under bfloat16 autocast, with fp32 weights, fp32 losses and the
    PGD steps on fp32 images; "auto" is bf16 on a CUDA GPU with bf16 tensor cores (compute capability 8.0 and
    up) and fp32 everywhere else, so CPU runs keep their fp32 numbers. Evaluation is always fp32 (docs/precision.md).
    compile: `torch.compile` two graphs: the training forward (and its backward) on the network, and the attack's
    forward and input-gradient backward on the network's BN-folded copy, whose weights need no gradient.
    graph_attack: on a CUDA GPU, the whole training attack (start, every PGD step) is captured once per batch shape
    as a CUDA graph and replayed: one launch per attack instead of a few hundred per PGD step. The same
    arithmetic; on the CPU the same program runs uncaptured.
    """

    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    graph_attack: bool = False

    @field_validator("precision", mode="before")
    @classmethod
    def _no_fp16(cls, value: object) -> object:
        if isinstance(value, str) and value.lower() in {"fp16", "float16", "half"}:
            raise ValueError(
                f"{value!r} is not supported: use 'bf16' (fp32's exponent range, no loss scaling; the paper's "
                "pipeline lost about 3 points of robustness to an fp16 attack), 'fp32' or 'auto'"
            )
        return value

    def resolved_precision(self, device_type: str, bf16_tensor_cores: bool = True) -> Literal["fp32", "bf16"]:
        """The precision "auto" stands for on `device_type` ("cuda", "cpu", ...); explicit choices stay."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if device_type == "cuda" and bf16_tensor_cores else "fp32"


class WorkloadConfig(_Strict):
    """What a cell trains and how it is evaluated: the spec's `workload` section (its defaults for every cell)."""

    data: DataConfig
    model: ModelConfig = ModelConfig()
    attack: AttackConfig = AttackConfig()
    training: TrainingConfig = TrainingConfig()
    recipe: RecipeConfig = RecipeConfig()
    eval: EvalConfig = EvalConfig()
    performance: PerformanceConfig = PerformanceConfig()
    seed: int = Field(0, ge=0, le=MAX_SEED)


def fork_point_file(folder: str, epoch: int, suffix: str = ".pt") -> str:
    """A fork point in `folder`: the training state after `epoch` epochs (`.pt`), and its marker (`.json`), written
    after the state, so that a marker says the state is complete."""
    return f"{folder.rstrip('/')}/epoch_{epoch}{suffix}"


class ForkConfig(_Strict):
    """A cell's part in forking (the spec's `fork_bn_star`, orchestrator.grid.fork_twins). A BN* cell trains exactly
    as its BN twin until BN* switches on (Section 4.3, Table 2: the last epochs only), so it can start from the
    twin's training state at that epoch instead of training the same epochs again."""

    # As a fork's parent: save the whole training state after each of these epochs into `save_to`
    # (`fork_point_file`), a folder no checkpoint rotation touches.
    save_epochs: tuple[int, ...] = ()
    save_to: str = ""
    # As a fork: with no checkpoint of its own, start from this fork point (a `.pt` of `fork_point_file`) of cell
    # `parent`.
    start_from: str = ""
    parent: str = ""


class TrainConfig(WorkloadConfig):
    """Everything one cell needs: the workload, resolved for the cell by the orchestrator (orchestrator.grid),
    plus the fields the orchestrator decides and the workload only reads: how many data-parallel workers, whether
    they have GPUs, and the checkpoint policy. The orchestrator builds it; the workload never changes it."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    checkpoint_every: int = Field(1, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    # Operational: where the run saves or starts from a fork point. Left out of every dump (config.json,
    # results.parquet, the cell id): a forked cell trains exactly what the same cell trains from scratch.
    fork: ForkConfig | None = Field(None, exclude=True)

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per optimizer step: workers x per-worker batch may be smaller than the global batch."""
        return self.recipe.batch_size // (self.num_workers * self.recipe.per_worker_batch)

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        per_step = self.num_workers * self.recipe.per_worker_batch
        if self.recipe.batch_size % per_step:
            raise ValueError(
                f"recipe.batch_size {self.recipe.batch_size} is not divisible by num_workers x "
                f"recipe.per_worker_batch = {self.num_workers} x {self.recipe.per_worker_batch} = {per_step}"
            )
        if self.model.bn_star_epochs and self.model.norm not in RUNNING_STATS_NORMS:
            raise ValueError(
                f"model.bn_star_epochs needs a BN model (norm {' or '.join(RUNNING_STATS_NORMS)}); "
                f"{self.model.norm} has no running statistics"
            )
        if self.training.strategy == "standard" and self.model.norm == "mbn":
            # MBN keeps separate BN statistics for adversarial and clean images (Section 4.2); standard training
            # has no adversarial images, so one branch would never train and the evaluation of it would be noise.
            raise ValueError(
                "training.strategy standard has no adversarial images for MBN's adversarial branch; "
                "use norm bn for standard training (the paper's '0% adv + 100% clean' is a BN model)"
            )
        if self.model.bn_star_epochs > self.recipe.epochs:
            raise ValueError(
                f"model.bn_star_epochs {self.model.bn_star_epochs} exceeds recipe.epochs {self.recipe.epochs}"
            )
        return self
