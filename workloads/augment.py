"""Input transforms of one image: the paper's ImageNet augmentation, its evaluation crop, and a CIFAR-style option.

The paper trains every model with the public pipeline of Xie et al. (2019b), FAIR's ImageNet-Adversarial-Training
(tensorpack; its ``fbresnet_augmentor``), and evaluates on the same resize-and-centre-crop. Train:

1. random crop covering 8-100 % of the image area with aspect ratio 3/4-4/3 (10 tries, then the central square:
   tensorpack's ``GoogleNetResize`` falls back to a shorter-side resize plus centre crop), bicubic to ``size``;
2. brightness x U(0.6, 1.4), contrast U(0.6, 1.4) towards the mean grey, saturation 1 + U(-0.4, 0.4) and
   AlexNet-PCA lighting with std 0.1, in a random order (tensorpack's ``RandomOrderAug``);
3. horizontal flip with probability 1/2; uint8 pixels (the model scales them, so the attack's eps stays on the
   0-255 scale).

Eval: shorter side to ``size / eval_crop`` (256 for 224), bicubic, centre crop ``size``.

Step 2 is one affine map of each pixel's colour (:func:`colour_map`). Decoding processes apply it on CPU workers;
for a GPU worker they only draw it and send it with the batch, and the GPU applies it
(`workloads.execution.apply_colour`): an eighth of the decoding work off the CPUs, the same images up to one
level of rounding (the device takes the exact mean grey, the CPU path one from 8 x 8 box averages).

Every random draw of one image comes from a generator seeded by (seed, epoch, sample index), so an image looks
the same whichever process decodes it, in whatever order, and a run resumed at an epoch boundary sees exactly
the images an uninterrupted one would have seen.

One liberty, measured in tests/test_imagenet_data.py: a JPEG whose crop is at least twice ``size`` on both sides
after reduction is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, PIL's ``draft``) before the bicubic
resize.

This module imports neither torch nor ray (workloads.config imports it; decoding processes import only this).
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

AugmentName = Literal["auto", "paper", "crop_flip", "none"]

# AlexNet's PCA of ImageNet RGB pixels (Krizhevsky et al. 2012), as fb.resnet.torch and tensorpack use it; the
# eigenvalues are on the 0-1 scale, tensorpack multiplies them by 255 for uint8 pixels.
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
# ITU-R 601-2 luma, what both OpenCV's and PIL's grey conversions use.
GREY = (0.299, 0.587, 0.114)
CROP_TRIES = 10
# Leads every per-image seed sequence (numpy's SeedSequence treats trailing zeros as absent).
_AUGMENT_STREAM = 5


class AugmentConfig(BaseModel):
    """How training images are augmented (``data.augment`` of a cell); evaluation always takes the centre crop.

    name: "paper" is the pipeline above; "crop_flip" pads ``padding`` zero pixels, takes a random ``size`` crop
    and flips (the usual CIFAR recipe, for the small stem on small decoded images); "none" feeds training the
    evaluation view; "auto" is "paper" for datasets stored as encoded images (ImageNet converted with
    ``python -m workloads.data folder``) and "none" for datasets stored decoded (digits, synthetic), so small-stem
    CPU runs train on exactly the pixels they always did unless a cell asks for augmentation.
    size: side of the square the model sees; None takes it from the dataset's ``image_shape``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: AugmentName = "auto"
    size: int | None = Field(None, ge=8, le=4096)
    area: tuple[float, float] = (0.08, 1.0)
    aspect: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = Field(0.4, ge=0, lt=1)
    contrast: float = Field(0.4, ge=0, lt=1)
    saturation: float = Field(0.4, ge=0, le=1)
    lighting: float = Field(0.1, ge=0, le=1)
    flip: bool = True
    padding: int = Field(4, ge=0, le=256)
    # 224 / 256: the evaluation crop's share of the resized shorter side.
    eval_crop: float = Field(0.875, gt=0, le=1)

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        lo, hi = self.area
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"area {list(self.area)} must satisfy 0 < low <= high <= 1 (the paper: [0.08, 1.0])")
        lo, hi = self.aspect
        if not 0 < lo <= hi:
            raise ValueError(f"aspect {list(self.aspect)} must satisfy 0 < low <= high (the paper: [0.75, 1.333])")
        return self

    def resolved(self, encoded: bool) -> Literal["paper", "crop_flip", "none"]:
        """The transform "auto" stands for on a dataset stored encoded (True) or decoded (False)."""
        if self.name == "auto":
            return "paper" if encoded else "none"
        return self.name


def image_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator behind every random draw of sample ``index`` in ``epoch`` of a run seeded ``seed``."""
    import numpy as np

    return np.random.default_rng([_AUGMENT_STREAM, seed, epoch, index])


# ------------------------------------------------------------------------------------------------------------
# Geometry


def random_crop_box(
    width: int, height: int, cfg: AugmentConfig, rng: np.random.Generator
) -> tuple[float, float, float, float]:
    """tensorpack's ``GoogleNetResize`` crop: (left, top, right, bottom) in source pixels."""
    area = width * height
    log_lo, log_hi = math.log(cfg.aspect[0]), math.log(cfg.aspect[1])
    for _ in range(CROP_TRIES):
        target = rng.uniform(cfg.area[0], cfg.area[1]) * area
        # Log-uniform aspect, symmetric in w/h (tensorpack draws uniformly and swaps sides with probability 1/2;
        # for [3/4, 4/3] both give the same range and nearly the same law).
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(math.sqrt(target * aspect) + 0.5)
        h = int(math.sqrt(target / aspect) + 0.5)
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    return centre_square(width, height)


def centre_square(width: int, height: int, fraction: float = 1.0) -> tuple[float, float, float, float]:
    """The central square of side ``fraction`` x the shorter side, in (sub-pixel) source coordinates: a
    shorter-side resize followed by a centre crop, in one resampling."""
    side = min(width, height) * fraction
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


# ------------------------------------------------------------------------------------------------------------
# Colour


# A colour map's parameters: x -> a x + b (g . x) 1 + u + v m, with g the grey weights and m the image's mean grey
# before the map: a, b, u (3), v (3); for a greyscale image u and v repeat one value.
COLOUR_PARAMS = 8


def colour_map(colour: bool, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, saturation and lighting in a random order (tensorpack's ``RandomOrderAug``), composed
    into one map of the pixel's colour: its :data:`COLOUR_PARAMS` parameters, float64.

    Each of the four is affine in the colour, so the four compose exactly into x -> M x + t, applied in a single
    pass with one rounding and clip at the end: what tensorpack computes in float with ``clip=False``. Brightness,
    contrast and saturation keep M of the form a I + b 1 g^T (g sums to 1), tracked as two scalars. Contrast
    blends towards the current image's mean grey, which is the composed map applied to the original mean m, so t
    is affine in m: t = u + v m, and the map needs nothing of the image until it is applied (:func:`apply_colour`
    here, `workloads.execution.apply_colour` on a training device). ``colour`` False (a greyscale image):
    brightness and contrast only.
    """
    import numpy as np

    # Draw every value first, in a fixed order, so the draws do not depend on the image.
    order = rng.permutation(4).tolist()
    bright = float(rng.uniform(1 - cfg.brightness, 1 + cfg.brightness))
    contrast = float(rng.uniform(1 - cfg.contrast, 1 + cfg.contrast))
    sat = float(rng.uniform(1 - cfg.saturation, 1 + cfg.saturation))
    alpha = (rng.standard_normal(3) * cfg.lighting).tolist()
    grey = _grey if colour else (lambda values: values[0])
    a, b = 1.0, 0.0
    u = [0.0, 0.0, 0.0] if colour else [0.0]
    v = list(u)
    for op in order:
        if op == 0 and cfg.brightness:
            a, b, u, v = a * bright, b * bright, [x * bright for x in u], [x * bright for x in v]
        elif op == 1 and cfg.contrast:
            # The current mean grey is (a + b) m + g.u + (g.v) m.
            mean_u, mean_v = grey(u), a + b + grey(v)
            u = [contrast * x + (1 - contrast) * mean_u for x in u]
            v = [contrast * x + (1 - contrast) * mean_v for x in v]
            a, b = a * contrast, b * contrast
        elif op == 2 and cfg.saturation and colour:
            # S = s I + (1 - s) 1 g^T; S M = s a I + (s b + (1 - s)(a + b)) 1 g^T, S t = s t + (1 - s)(g . t) 1.
            shift_u, shift_v = (1 - sat) * grey(u), (1 - sat) * grey(v)
            a, b = sat * a, sat * b + (1 - sat) * (a + b)
            u, v = [sat * x + shift_u for x in u], [sat * x + shift_v for x in v]
        elif op == 3 and cfg.lighting and colour:
            for c in range(3):
                u[c] += 255.0 * sum(PCA_EIGVEC[c][k] * alpha[k] * PCA_EIGVAL[k] for k in range(3))
    if not colour:
        u, v = u * 3, v * 3
    return np.array([a, b, *u, *v], dtype=np.float64)


def apply_colour(img: Image.Image, params: np.ndarray) -> Image.Image:
    """A :func:`colour_map` applied to an RGB or greyscale image, rounded and clipped to uint8."""
    import numpy as np

    colour = img.mode == "RGB"
    a, b = float(params[0]), float(params[1])
    u, v = params[2:5], params[5:8]
    mean = 0.0
    if np.any(v):
        # Mean of the 8 x 8 box averages: the image's mean up to their rounding, from 64x fewer pixels.
        small = img.reduce(8) if min(img.size) >= 64 else img
        means = np.asarray(small, dtype=np.float64).reshape(-1, 3 if colour else 1).mean(axis=0).tolist()
        mean = _grey(means) if colour else means[0]
    t = (u + v * mean).tolist()
    if colour:
        matrix = tuple(x for c in range(3) for x in (*(a * (c == j) + b * GREY[j] for j in range(3)), t[c]))
        return img.convert("RGB", matrix=matrix)
    levels = np.clip(np.rint((a + b) * np.arange(256) + t[0]), 0, 255).astype(np.uint8)
    return img.point(levels.tolist())


def _grey(rgb: list[float]) -> float:
    return GREY[0] * rgb[0] + GREY[1] * rgb[1] + GREY[2] * rgb[2]


# ------------------------------------------------------------------------------------------------------------
# Whole images


def open_image(payload: bytes) -> Image.Image:
    """A lazily decoded image (PIL reads only the header until pixels are needed)."""
    from PIL import Image as PILImage

    return PILImage.open(io.BytesIO(payload))


def _rgb_or_grey(img: Image.Image) -> Image.Image:
    if img.mode in ("RGB", "L"):
        return img
    # CMYK JPEGs, palettes, alpha, 16-bit greyscale: the model sees RGB like the rest.
    return img.convert("RGB")


def _reduced_decode(
    img: Image.Image, box: tuple[float, float, float, float], size: int
) -> tuple[float, float, float, float]:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the crop stays >= 2 x size on both sides there; returns
    the crop box in the reduced image's pixels. Other formats, and crops too small to shrink, decode in full."""
    if img.format != "JPEG":
        return box
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    factor = 1
    while factor < 8 and min(crop_w, crop_h) >= 4 * size * factor:
        factor *= 2
    if factor == 1:
        return box
    width, height = img.size
    img.draft(img.mode if img.mode in ("RGB", "L") else None, (-(-width // factor), -(-height // factor)))
    sx, sy = img.size[0] / width, img.size[1] / height
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


def _resized(img: Image.Image, box: tuple[float, float, float, float], size: int, reduce: bool = True) -> Image.Image:
    from PIL import Image as PILImage

    if reduce:
        box = _reduced_decode(img, box, size)
    img = _rgb_or_grey(img)
    # Crop and bicubic resize in one pass (the crop is the resize's source box).
    return img.resize((size, size), PILImage.Resampling.BICUBIC, box=box)


def train_view(
    img: Image.Image,
    name: str,
    cfg: AugmentConfig,
    size: int,
    rng: np.random.Generator,
    colour: np.ndarray | None = None,
) -> Image.Image:
    """One augmented training view of ``img`` (``name``: a resolved transform, "paper" or "none"). With a
    ``colour`` row, the view's colour map is written there instead of applied (the flip that follows commutes
    with it, and leaves the mean grey it depends on unchanged)."""
    from PIL import Image as PILImage

    if name == "none":
        return eval_view(img, cfg, size)
    out = _resized(img, random_crop_box(*img.size, cfg, rng), size)
    params = colour_map(out.mode == "RGB", cfg, rng)
    if colour is None:
        out = apply_colour(out, params)
    else:
        colour[:] = params
    # PIL's mirror, not a reversed numpy copy of the pixels: a tenth of its cost.
    return out.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT) if cfg.flip and rng.random() < 0.5 else out


def eval_view(img: Image.Image, cfg: AugmentConfig, size: int) -> Image.Image:
    """Shorter side to size / eval_crop, bicubic, centre crop ``size`` (the crop box mapped back to the source)."""
    return _resized(img, centre_square(*img.size, cfg.eval_crop), size)


def pad_crop_flip(images: np.ndarray, cfg: AugmentConfig, rngs: list[np.random.Generator]) -> np.ndarray:
    """The "crop_flip" transform of decoded (N, C, H, W) uint8 images: zero padding, random crop, flip."""
    import numpy as np

    n, c, h, w = images.shape
    p = cfg.padding
    padded = np.zeros((n, c, h + 2 * p, w + 2 * p), dtype=np.uint8)
    padded[:, :, p : p + h, p : p + w] = images
    out = np.empty_like(images)
    for i, rng in enumerate(rngs):
        top, left = (int(v) for v in rng.integers(0, 2 * p + 1, size=2))
        view = padded[i, :, top : top + h, left : left + w]
        out[i] = view[:, :, ::-1] if cfg.flip and rng.random() < 0.5 else view
    return out


def to_chw(img: Image.Image, channels: int) -> np.ndarray:
    """(C, H, W) uint8, a view of the pixels as PIL lays them out, (H, W, C); a greyscale image of a colour dataset
    keeps one channel, which assigning it to a (3, H, W) row broadcasts to three."""
    import numpy as np

    pixels = np.asarray(img)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    elif pixels.shape[2] != channels:
        pixels = pixels[:, :, :1]
    return pixels.transpose(2, 0, 1)


def decode_batch(
    payloads: list[bytes],
    indices: list[int],
    *,
    train: bool,
    name: str,
    cfg: AugmentConfig,
    size: int,
    channels: int,
    seed: int,
    epoch: int,
    out: np.ndarray | None = None,
    colour: np.ndarray | None = None,
    channels_last: bool = False,
) -> np.ndarray:
    """Decode (and for training augment) encoded images into one (N, C, size, size) uint8 array: the first N
    rows of ``out`` when given (a shared-memory slot, `workloads.slots`), an (N, C, size, size) buffer, or with
    ``channels_last`` an (N, size, size, C) one, returned as its (N, C, size, size) view. With ``colour``
    ((N, COLOUR_PARAMS)), the "paper" transform's colour maps are written there instead of applied (see
    :func:`train_view`).

    ``channels_last`` is for batches bound for a GPU, which trains in that layout
    (`workloads.execution.Execution.channels_last`): it is PIL's own, so each image is one contiguous copy, where
    a (C, H, W) row needs a strided one (0.05-0.15 ms an image on the 2-core machine, of about 2 ms to decode and
    augment it). A CPU worker trains on contiguous (N, C, H, W) batches, and that strided copy had better be
    made here, beside the training process, than in it. Runs in decoding processes; what it returns depends
    only on its arguments.
    """
    import numpy as np

    n = len(payloads)
    if out is None:
        out = np.empty((n, size, size, channels) if channels_last else (n, channels, size, size), dtype=np.uint8)
    rows = out[:n].transpose(0, 3, 1, 2) if channels_last else out[:n]
    for i, (payload, index) in enumerate(zip(payloads, indices, strict=True)):
        img = open_image(payload)
        if train:
            rng = image_rng(seed, epoch, index)
            view = train_view(img, name, cfg, size, rng, None if colour is None else colour[i])
        else:
            view = eval_view(img, cfg, size)
        rows[i] = to_chw(view, channels)
    return rows


def deferring_colour(fn: Any, stored: Any, *args: Any, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """``fn(stored, *args, colour=maps, **kwargs)`` (:func:`decode_batch` or :func:`augment_decoded`) and the
    (N, COLOUR_PARAMS) float32 colour maps it left unapplied, for the training device to apply."""
    import numpy as np

    # Identity maps until fn writes them: a row it skipped leaves the image as it is, not black.
    maps = np.zeros((len(stored), COLOUR_PARAMS), dtype=np.float32)
    maps[:, 0] = 1
    return fn(stored, *args, colour=maps, **kwargs), maps


def augment_decoded(
    images: np.ndarray,
    indices: Any,
    *,
    name: str,
    cfg: AugmentConfig,
    size: int,
    seed: int,
    epoch: int,
    colour: np.ndarray | None = None,
) -> np.ndarray:
    """A requested transform ("paper" or "crop_flip") on images stored decoded, (N, C, H, W) uint8; ``colour`` as
    for :func:`decode_batch`."""
    import numpy as np
    from PIL import Image as PILImage

    rngs = [image_rng(seed, epoch, int(i)) for i in indices]
    if name == "crop_flip":
        return pad_crop_flip(images, cfg, rngs)
    c = images.shape[1]
    out = np.empty((len(images), c, size, size), dtype=np.uint8)
    for k, (image, rng) in enumerate(zip(images, rngs, strict=True)):
        pil = PILImage.fromarray(image[0] if c == 1 else image.transpose(1, 2, 0))
        view = train_view(pil, name, cfg, size, rng, None if colour is None else colour[k])
        out[k] = to_chw(view, c)
    return out
