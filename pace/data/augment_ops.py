"""timm's RandAugment ops on uint8 image tensors: a batch grouped by op (`decode="device"`), or one image in a
worker (`decode="draft"`)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from timm.data import auto_augment

from pace.data.augment_params import GEOMETRIC_OPS, PIL_FILTERS
from pace.data.transforms import _posterize


def apply_ops(images: torch.Tensor, ops: list[tuple[str, tuple, str | None] | None], fill: tuple[int, ...]):
    """Apply one RandAugment layer: sample `k` gets `ops[k]` (None: unchanged), grouped by op over the batch.

    Args:
        images: (B, 3, H, W) uint8.
        ops: per sample, `(name, args, interpolation)` as `ParamSampler.sample_ops` records them.
        fill: fill colour of the geometric ops.

    Returns:
        (B, 3, H, W) uint8.
    """
    out = images.clone()
    groups: dict[tuple, list[int]] = {}
    for index, op in enumerate(ops):
        if op is not None:
            name, _, interpolation = op
            groups.setdefault((name, interpolation if name in GEOMETRIC_OPS else None), []).append(index)
    for (name, interpolation), members in groups.items():
        index = torch.tensor(members, device=images.device)
        args = [ops[k][1] for k in members]
        out[index] = _apply_group(name, images[index], args, interpolation, fill)
    return out


def _apply_group(name: str, x: torch.Tensor, args: list[tuple], interpolation: str | None, fill) -> torch.Tensor:
    """One op on a group of images (N, 3, H, W) uint8, each with its own arguments."""
    if name == "auto_contrast":
        return TF.autocontrast(x)
    if name == "equalize":
        return TF.equalize(x)
    if name == "invert":
        return TF.invert(x)
    if name in GEOMETRIC_OPS:
        return _affine(x, [_inverse_matrix(name, a, x.shape[-1], x.shape[-2]) for a in args], interpolation, fill)
    value = torch.tensor([a[0] for a in args], dtype=torch.float32, device=x.device).view(-1, 1, 1, 1)
    if name == "posterize":
        bits = value.clamp(0, 8).to(torch.int32)
        mask = (0xFF << (8 - bits)) & 0xFF  # keep the top `bits` bits (0 bits: black, as timm's posterize)
        return (x.to(torch.int32) & mask).to(torch.uint8)
    if name == "solarize":
        return torch.where(x.float() >= value, 255 - x, x)
    if name == "solarize_add":
        threshold = args[0][1] if len(args[0]) > 1 else 128
        return torch.where(x < threshold, (x.float() + value).clamp(max=255).to(torch.uint8), x)
    return _enhance(name, x, value)


def _enhance(name: str, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's ImageEnhance ops: blend the image with a degenerate version by a per-sample factor."""
    image = x.float()
    if name == "brightness":
        degenerate = torch.zeros_like(image)
    elif name == "color":
        degenerate = _gray(image).expand_as(image)
    elif name == "contrast":
        degenerate = (_gray(image).mean(dim=(-3, -2, -1), keepdim=True) + 0.5).floor().expand_as(image)
    elif name == "sharpness":
        kernel = torch.ones(3, 3, device=x.device)
        kernel[1, 1] = 5.0
        kernel = (kernel / kernel.sum()).expand(3, 1, 3, 3)
        smooth = F.conv2d(image, kernel, groups=3).round()
        degenerate = image.clone()
        degenerate[..., 1:-1, 1:-1] = smooth  # Pillow keeps the border pixels
    else:
        raise ValueError(f"unknown RandAugment op {name}")
    return (degenerate + factor * (image - degenerate)).round().clamp(0, 255).to(torch.uint8)


def _gray(image: torch.Tensor) -> torch.Tensor:
    r, g, b = image.unbind(-3)
    return (0.299 * r + 0.587 * g + 0.114 * b).floor().unsqueeze(-3)  # Pillow's "L" conversion (truncated)


def _inverse_matrix(name: str, args: tuple, width: int, height: int) -> list[float]:
    """Pillow's affine data (output pixel -> input pixel) of timm's geometric ops."""
    value = args[0]
    if name == "shear_x":
        return [1, value, 0, 0, 1, 0]
    if name == "shear_y":
        return [1, 0, 0, value, 1, 0]
    if name == "translate_x_rel":
        return [1, 0, value * width, 0, 1, 0]
    if name == "translate_y_rel":
        return [1, 0, 0, 0, 1, value * height]
    if name == "translate_x_abs":
        return [1, 0, value, 0, 1, 0]
    if name == "translate_y_abs":
        return [1, 0, 0, 0, 1, value]
    angle = -math.radians(value)  # rotate: counter-clockwise about the centre, as Image.rotate
    cos, sin = math.cos(angle), math.sin(angle)
    cx, cy = width / 2, height / 2
    return [cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy]


def _affine(x: torch.Tensor, matrices: list[list[float]], interpolation: str | None, fill) -> torch.Tensor:
    """Resample each image through its Pillow-style affine map (pixel centres at +0.5), filling outside."""
    n, _, h, w = x.shape
    m = torch.tensor(matrices, dtype=torch.float32, device=x.device).view(n, 2, 3)
    # normalised output -> pixel output -> pixel input -> normalised input (align_corners=False convention)
    to_pixel = torch.tensor([[w / 2, 0, w / 2], [0, h / 2, h / 2], [0, 0, 1]], device=x.device)
    to_norm = torch.tensor([[2 / w, 0, -1], [0, 2 / h, -1]], device=x.device)
    full = torch.cat([m, torch.tensor([[[0.0, 0.0, 1.0]]], device=x.device).expand(n, 1, 3)], dim=1)
    theta = to_norm @ full @ to_pixel  # (n, 2, 3)
    grid = F.affine_grid(theta, [n, 4, h, w], align_corners=False)
    inside = torch.ones(n, 1, h, w, device=x.device)
    sampled = F.grid_sample(
        torch.cat([x.float(), inside], dim=1), grid, mode=interpolation or "bilinear", align_corners=False
    )
    colour = torch.tensor(fill, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    mask = (sampled[:, 3:] > 0.5).float()  # Pillow fills a pixel whose source lies outside
    return (sampled[:, :3] * mask + colour * (1 - mask)).round().clamp(0, 255).to(torch.uint8)


# -- RandAugment on one image (the draft workers; decode="device" on a CPU) ---------------------------------------

# Ops whose affine map moves pixels along one axis only (x: along rows, y: along columns), by an amount that is
# constant per line: Pillow's bicubic for them is a 1-D filter per line (`shift_lines`).
_LINE_SHIFTS = {
    "shear_x": "x",
    "shear_y": "y",
    "translate_x_rel": "x",
    "translate_y_rel": "y",
    "translate_x_abs": "x",
    "translate_y_abs": "y",
}

# Ops computed on the tensor with Pillow's own arithmetic (tests: equal to timm's Pillow ops): level tables, and
# ImageEnhance's blends with a degenerate picture.
_ON_TENSOR = {"auto_contrast", "equalize", "invert", "posterize", "solarize", "solarize_add"}
_ON_TENSOR |= {"brightness", "contrast", "color", "sharpness"}


def apply_recorded(picture: torch.Tensor, ops: list[tuple[str, tuple, str | None]], fill: tuple[int, ...]):
    """Apply one sample's recorded RandAugment ops in order, as timm's Pillow RandAugment does: level tables and
    ImageEnhance ops on the tensor with Pillow's arithmetic (`pillow_op`, exact); shears and translations with
    bicubic resampling, which move pixels along one axis, as `shift_lines` / `shift_all` (Pillow's affine bicubic
    at a third to half its cost; equal up to one level of rounding); rotate (and geometric ops with other filters)
    with timm's Pillow functions. An op that follows a Pillow op runs in Pillow (the picture is there already).

    Args:
        picture: (3, H, W) uint8.
        ops: `(name, args, interpolation)` as `ParamSampler.sample_ops` records them.
        fill: fill colour of the geometric ops (uint8 RGB).

    Returns:
        (3, H, W) uint8 (a PIL image only lives while Pillow ops run in a row).
    """
    image = None  # the PIL form of `picture` while Pillow ops run
    for name, args, interpolation in ops:
        if name in _ON_TENSOR and image is None:
            picture = pillow_op(picture, name, args)
        elif name in _LINE_SHIFTS and interpolation == "bicubic":
            if image is not None:
                picture, image = pil_to_chw(image), None
            picture = _line_shift_op(picture, name, args[0], fill)
        else:
            image = _pil_op(image if image is not None else chw_to_pil(picture), name, args, interpolation, fill)
    return pil_to_chw(image) if image is not None else picture


def pillow_op(picture: torch.Tensor, name: str, args: tuple) -> torch.Tensor:
    """A point or ImageEnhance op of timm's RandAugment on a (3, H, W) uint8 tensor, with Pillow's arithmetic.

    auto_contrast and equalize map each band through a table made from its histogram, as ImageOps makes it
    (auto_contrast without cutoff: from the band's lowest and highest level). invert, posterize, solarize and
    solarize_add are Pillow's level tables written as bit operations. brightness,
    contrast, color and sharpness are ImageEnhance's `Image.blend(degenerate, image, factor)` (float32, clipped,
    truncated) with its degenerate pictures: black; the mean of Pillow's "L" levels, rounded; the "L" levels; the
    SMOOTH filter (kernel 1 1 1 / 1 5 1 / 1 1 1 over 13, rounded), border pixels kept.

    Args:
        picture: (3, H, W) uint8.
        name: the op.
        args: its recorded arguments.

    Returns:
        (3, H, W) uint8.
    """
    levels = picture.numpy()
    if name in ("auto_contrast", "equalize"):
        return torch.from_numpy(
            np.stack([np.take(table, band) for table, band in zip(_band_tables(name, levels), levels)])
        )
    if name == "invert":
        return torch.from_numpy(~levels)
    if name == "posterize":
        bits = min(8, max(0, int(args[0])))
        return torch.from_numpy(levels & np.uint8((0xFF << (8 - bits)) & 0xFF))  # 0 bits: black, as timm's
    if name in ("solarize", "solarize_add"):
        if name == "solarize":  # levels at or above the threshold inverted
            changed, chosen = ~levels, levels >= args[0]
        else:  # levels below the threshold raised by `add`, capped at 255
            add = int(args[0])
            changed, chosen = (
                np.minimum(levels, 255 - add) + np.uint8(add),
                levels < (args[1] if len(args) > 1 else 128),
            )
        return torch.from_numpy(levels ^ ((levels ^ changed) & (chosen.view(np.uint8) * np.uint8(255))))
    if name == "brightness":
        degenerate = np.zeros((1, 1, 1), np.float32)
    elif name == "sharpness":
        wide = levels.astype(np.int32)
        inner = wide[:, :-2, :-2] + wide[:, :-2, 1:-1] + wide[:, :-2, 2:] + wide[:, 1:-1, :-2] + wide[:, 1:-1, 2:]
        inner += wide[:, 2:, :-2] + wide[:, 2:, 1:-1] + wide[:, 2:, 2:] + 5 * wide[:, 1:-1, 1:-1]
        wide[:, 1:-1, 1:-1] = (2 * inner + 13) // 26  # rounded sum / 13 (never a tie: 13 is odd)
        degenerate = wide.astype(np.float32)
    else:
        red, green, blue = levels.astype(np.int32)
        grey = (red * 19595 + green * 38470 + blue * 7471 + 0x8000) >> 16  # Pillow's RGB -> L, in fixed point
        if name == "contrast":
            degenerate = np.full((1, 1, 1), int(grey.sum() / grey.size + 0.5), np.float32)
        else:  # color
            degenerate = grey[None].astype(np.float32)
    mixed = degenerate + np.float32(args[0]) * (levels.astype(np.float32) - degenerate)
    return torch.from_numpy(mixed.clip(0, 255).astype(np.uint8))


def _band_tables(name: str, levels: np.ndarray) -> list[np.ndarray]:
    """Per band, ImageOps' table of `auto_contrast` (cutoff 0) or `equalize` for (3, H, W) uint8 `levels`."""
    tables = []
    for band in levels:
        if name == "auto_contrast":
            low, high = int(band.min()), int(band.max())
            scale = 255.0 / max(1, high - low)
            table = (np.arange(256) * scale - low * scale).astype(np.int64).clip(0, 255)  # int(): toward zero
            tables.append(table.astype(np.uint8) if high > low else np.arange(256, dtype=np.uint8))
            continue
        histogram = np.bincount(band.reshape(-1), minlength=256)
        used = histogram[histogram > 0]
        step = (int(used.sum()) - int(used[-1])) // 255 if len(used) > 1 else 0
        if not step:
            tables.append(np.arange(256, dtype=np.uint8))
            continue
        below = np.concatenate([[0], np.cumsum(histogram)[:-1]])  # pixels below each level
        tables.append(((step // 2 + below) // step).clip(0, 255).astype(np.uint8))
    return tables


def _line_shift_op(picture: torch.Tensor, name: str, value: float, fill: tuple[int, ...]) -> torch.Tensor:
    _, height, width = picture.shape
    along_x = _LINE_SHIFTS[name] == "x"
    if name.startswith("translate"):
        pixels = value * (width if along_x else height) if name.endswith("_rel") else value
        return shift_all(picture, float(pixels), fill, dim=2 if along_x else 1)
    lines = height if along_x else width  # the lines that move: rows for x shears, columns for y shears
    shifts = value * (torch.arange(lines, dtype=torch.float64) + 0.5)
    if along_x:
        return shift_lines(picture, shifts, fill)
    moved = shift_lines(picture.transpose(1, 2), shifts, fill).numpy()
    return torch.from_numpy(np.ascontiguousarray(moved.transpose(0, 2, 1)))  # numpy's copy: twice torch's speed


def shift_all(picture: torch.Tensor, shift: float, fill: tuple[int, ...], *, dim: int) -> torch.Tensor:
    """`shift_lines` for a translation: every line moves by the same `shift` along `dim` (2: rows, x; 1: columns,
    y), so one set of tap weights serves the whole picture and the taps are shifted slices (no gather, no
    transpose). Pillow's rule as in `shift_lines`: fill where the source pixel centre `x + 0.5 + shift` lies outside
    the picture, else the 4-tap cubic convolution (a = -1) with taps clamped to the ends, clipped and truncated.

    Args:
        picture: (C, H, W) uint8.
        shift: source offset in pixels.
        fill: fill colour (C values).
        dim: 2 moves pixels along rows, 1 along columns.

    Returns:
        (C, H, W) uint8.
    """
    size = picture.shape[dim]
    out = torch.tensor(fill, dtype=torch.uint8).view(-1, 1, 1).expand(picture.shape).clone()
    # output positions whose source centre lies inside: 0 <= x + 0.5 + shift < size
    first, stop = max(0, math.ceil(-0.5 - shift)), min(size, math.ceil(size - 0.5 - shift))
    if first >= stop:
        return out
    whole = math.floor(shift)
    weights = _cubic_weights(torch.tensor([shift - whole], dtype=torch.float64)).to(torch.float32).view(4).tolist()
    # two edge copies on each side hold every clamped tap: an inside source centre puts the taps within [-2, size + 1]
    edges = (picture.narrow(dim, 0, 1),) * 2, (picture.narrow(dim, size - 1, 1),) * 2
    padded = torch.cat([*edges[0], picture, *edges[1]], dim).float()
    count = stop - first
    start = first + whole + 1  # padded position of tap 0 (source x + whole - 1) for output `first`
    taps = padded.narrow(dim, start, count) * weights[0]
    for k in range(1, 4):
        taps.add_(padded.narrow(dim, start + k, count), alpha=weights[k])
    out.narrow(dim, first, count).copy_(_truncated(taps.clamp_(0, 255)))
    return out


def shift_lines(picture: torch.Tensor, shifts: torch.Tensor, fill: tuple[int, ...]) -> torch.Tensor:
    """Row `y` of the output samples row `y` of the input at `x + shifts[y]`, as Pillow's affine transform with
    bicubic resampling does for a map that moves pixels along rows only (shear_x, translate_x).

    Pillow's rule: the output pixel takes the fill colour when the source pixel centre `x + 0.5 + shift` lies
    outside `[0, W)`; otherwise a 4-tap cubic convolution (a = -1) of the row, taps clamped to the row's ends,
    clipped to 0..255 and truncated. Each row has one fractional offset, so the taps are one multiply-add per tap
    over the padded rows and one gather, not a 2-D resampling.

    Args:
        picture: (C, H, W) uint8 (any strides).
        shifts: (H,) float64 source offsets in pixels.
        fill: fill colour (C values).

    Returns:
        (C, H, W) uint8.
    """
    channels, height, width = picture.shape
    whole = torch.floor(shifts)
    weights = _cubic_weights(shifts - whole).to(torch.float32).view(4, 1, height, 1)
    whole = whole.to(torch.int64)
    low, high = int(whole.min()) - 1, int(whole.max()) + 2  # taps x + whole + k - 1, k = 0..3
    left, right = max(0, -low), max(0, high)  # columns beyond the picture's ends (clamped taps: edge values)
    padded = torch.empty(channels, height, left + width + right)
    padded[:, :, left : left + width] = picture
    padded[:, :, :left] = picture[:, :, :1]
    padded[:, :, left + width :] = picture[:, :, -1:]
    first = low + left  # padded column of the first tap needed
    span = width + high - low - 3  # tap-0 positions needed
    taps = padded[:, :, first : first + span] * weights[0]  # taps[..., j]: the filter with tap 0 at column low + j
    for k in range(1, 4):
        taps.addcmul_(padded[:, :, first + k : first + k + span], weights[k])
    fill_column = torch.tensor(fill, dtype=torch.uint8).view(channels, 1, 1).expand(channels, height, 1)
    levels = torch.cat([_truncated(taps.clamp_(0, 255)), fill_column], 2)  # the last column: the fill colour
    # Pillow's fill rule: the source pixel centre x + 0.5 + shift outside [0, W) takes the fill colour; per line
    # that is x below ceil(-0.5 - shift) or from ceil(W - 0.5 - shift) on.
    columns = torch.arange(width)[None, :]
    outside = (columns < torch.ceil(-0.5 - shifts)[:, None]) | (columns >= torch.ceil(width - 0.5 - shifts)[:, None])
    index = (whole - 1 - low)[:, None] + columns  # (H, W) column of `levels`
    return levels.gather(2, index.masked_fill_(outside, span).expand(channels, height, width))


def _truncated(values: torch.Tensor) -> torch.Tensor:
    """float values in [0, 255] to uint8, truncated as Pillow's filters do (numpy's conversion: several times
    faster than torch's on a CPU)."""
    return torch.from_numpy(values.numpy().astype(np.uint8))


def _cubic_weights(fraction: torch.Tensor) -> torch.Tensor:
    """Pillow's affine bicubic (Geometry.c, cubic convolution with a = -1): weights of the taps at -1, 0, 1, 2
    for a sample `fraction` past tap 0. Returns (4, N)."""
    d, d2 = fraction, fraction * fraction
    d3 = d2 * d
    return torch.stack([-d + 2 * d2 - d3, 1 - 2 * d2 + d3, d + d2 - d3, d3 - d2])


def _pil_op(image: Image.Image, name: str, args: tuple, interpolation: str | None, fill) -> Image.Image:
    function = _posterize if name == "posterize" else getattr(auto_augment, name)
    resample = PIL_FILTERS.get(interpolation or "bilinear", Image.Resampling.BILINEAR)
    return function(image, *args, fillcolor=tuple(fill), resample=resample)


def chw_to_pil(picture: torch.Tensor) -> Image.Image:
    """(3, H, W) uint8 tensor -> RGB PIL image. Pillow interleaves the three planes (`Image.merge`), several times
    faster than a transposing copy of the tensor."""
    _, height, width = picture.shape
    planes = picture.contiguous().numpy()
    return Image.merge("RGB", [Image.frombuffer("L", (width, height), plane, "raw", "L", 0, 1) for plane in planes])


def pil_to_chw(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> contiguous (3, H, W) uint8 tensor, one plane per band (`Image.split`)."""
    return torch.from_numpy(np.stack([np.asarray(band) for band in image.split()]))
