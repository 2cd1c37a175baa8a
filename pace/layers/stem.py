"""Convolutional patch embedding: log2(patch) stride-2 3x3 conv + BatchNorm stages.

References:
    https://github.com/facebookresearch/xcit/blob/main/xcit.py (ConvPatchEmbed, patch 8 and 16)
"""

import math

import torch
from torch import nn

__all__ = ["ConvStem"]


def _conv_bn(in_chs: int, out_chs: int, norm_layer: type[nn.Module], **dd) -> nn.Sequential:
    # Indices 0 (conv) and 1 (norm) are part of the checkpoint key names (`proj.{i}.0.weight`, `proj.{i}.1.*`).
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=2, padding=1, bias=False, **dd),
        norm_layer(out_chs, **dd),
    )


class ConvStem(nn.Module):
    """Image to tokens through ``log2(patch_size)`` stride-2 conv + norm stages with an activation between them.

    Stage widths double up to ``embed_dim`` (patch 16: d/8, d/4, d/2, d; patch 8: d/4, d/2, d; patch 4: d/2, d).
    The norm is plain ``BatchNorm2d`` by default; distributed training converts it to ``SyncBatchNorm``.

    Args:
        img_size: Nominal input size; only sets ``num_patches`` and ``grid_size`` (any multiple of the patch works).
        patch_size: Total stride, a power of two >= 2.
        in_chans: Input image channels.
        embed_dim: Output token width; must be divisible by ``patch_size / 2``.
        act_layer: Activation between stages (none after the last).
        norm_layer: Norm after each conv.
        device: Factory device.
        dtype: Factory dtype.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        num_stages = int(math.log2(patch_size)) if patch_size >= 2 else 0
        if num_stages < 1 or 2**num_stages != patch_size:
            raise ValueError(f"ConvStem: patch_size must be a power of two >= 2, got {patch_size}")
        if embed_dim % 2 ** (num_stages - 1):
            raise ValueError(
                f"ConvStem: embed_dim={embed_dim} is not divisible by {2 ** (num_stages - 1)}, "
                f"the width ratio of the first of {num_stages} stages for patch_size={patch_size}"
            )
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size = img_size
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

        widths = [embed_dim // 2 ** (num_stages - 1 - i) for i in range(num_stages)]
        layers: list[nn.Module] = []
        in_chs = in_chans
        for i, width in enumerate(widths):
            if i:
                layers.append(act_layer())
            layers.append(_conv_bn(in_chs, width, norm_layer, **dd))
            in_chs = width
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Embed images.

        Args:
            x: Images (B, in_chans, H, W) with H and W multiples of the patch size.

        Returns:
            Tokens (B, H' * W', embed_dim) in row-major order and the token grid (H', W').
        """
        x = self.proj(x)  # (B, C, H', W')
        grid = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), grid  # (B, N, C)
