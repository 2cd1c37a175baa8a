"""timm's RandAugment ops on uint8 image tensors, applied to a batch grouped by op (the device path)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from pace.data.augment_params import GEOMETRIC_OPS


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
