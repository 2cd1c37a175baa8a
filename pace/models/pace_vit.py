"""PACE-ViT: a conv-stem vision transformer whose token mixers are PACE blocks, registered with timm.

Layout (the reference network of the PACEAttention paper): conv stem with BatchNorm, Fourier positional encoding,
``depth`` PACE blocks (no MLP), a class token with two class-attention blocks, final norm, linear head.

References:
    https://github.com/SHIELD-SKY/PACEAttention (model/ECAttention.py, the authors' reference network)
    https://github.com/facebookresearch/xcit (conv patch embedding, Fourier encoding, class attention)
"""

from collections.abc import Callable
from functools import partial

import torch
from timm.layers import get_device_dtype, get_norm_layer, trunc_normal_
from timm.models import checkpoint, register_notrace_module
from timm.models._features import feature_take_indices
from timm.models.xcit import ClassAttentionBlock, PositionalEncodingFourier
from torch import nn

from pace.layers import REFERENCE_LAYER_NORM, ConvStem, PACEAttention, PACEBlock, SketchedModule

# timm's tooling looks for the weight converter in the module of the model class.
from pace.models.checkpoint_filter import checkpoint_filter_fn

__all__ = ["PACEViT", "checkpoint_filter_fn"]

_PATCH_SIZES = (4, 8, 16)
_GLOBAL_POOLS = ("", "avg", "token")
_CLS_ATTN_ETA = 1.0  # per-channel layer-scale init of the class-attention blocks
_PER_FORWARD = {"step", "reference"}  # sketch schedules that redraw on a forward (no gradient checkpointing)

# A block picks its sketch by token count (Python control flow), so torch.fx keeps it as one leaf call.
register_notrace_module(PACEBlock)


def _check_pool(global_pool: str, has_class_token: bool) -> None:
    # timm's tooling (and its generic tests) expects AssertionError for an unsupported pool, so raise exactly that.
    if global_pool not in _GLOBAL_POOLS:
        raise AssertionError(f"PACEViT: global_pool must be one of {_GLOBAL_POOLS}, got {global_pool!r}")
    if global_pool == "token" and not has_class_token:
        raise AssertionError("PACEViT: global_pool='token' needs the class token, which was pruned")


class _ClassAttentionBlock(ClassAttentionBlock):
    """timm's (XCiT's) class-attention block, which can also compute the class token alone (same parameters)."""

    def forward(self, x: torch.Tensor, class_token_only: bool = False) -> torch.Tensor:
        """Tokens (B, 1 + N, C) after the block, or with ``class_token_only`` the class token (B, 1, C) alone.

        timm's block norms every token after the attention (``tokens_norm``) and returns the patch tokens too;
        only the class token depends on its attention, and norm, MLP and residual are per token, so computing them
        for the class token alone gives the same numbers. A flag of the block's own forward, so that a compiled
        block (``compile_blocks``) runs this path compiled too.
        """
        if not class_token_only:
            return super().forward(x)
        cls = x[:, :1] + self.drop_path1(self.gamma1 * self.attn(self.norm1(x)))  # class attention: (B, 1, C)
        cls = self.norm2(cls)  # normed with or without tokens_norm
        return cls + self.drop_path2(self.gamma2 * self.mlp(cls))


def _class_attention_blocks(
    dim: int, num_heads: int, count: int, *, mlp_ratio: float, drop_rate: float, norm_layer: Callable, **dd
) -> nn.ModuleList:
    # The reference's class attention (XCiT's): biased qkv, dropout after the projections, every token normed.
    return nn.ModuleList(
        _ClassAttentionBlock(
            dim,
            num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            proj_drop=drop_rate,
            norm_layer=norm_layer,
            eta=_CLS_ATTN_ETA,
            tokens_norm=True,
            **dd,
        )
        for _ in range(count)
    )


def _classifier(dim: int, num_classes: int, **dd) -> nn.Module:
    return nn.Linear(dim, num_classes, **dd) if num_classes > 0 else nn.Identity()


class PACEViT(nn.Module):
    """Vision transformer with PACE (compression-expansion) token mixing and class-attention pooling.

    Args:
        img_size: Nominal input size (sets ``patch_embed.num_patches``); any multiple of the patch size runs.
        patch_size: Stem stride, one of 4, 8, 16 (log2(patch) stride-2 conv stages).
        in_chans: Input image channels.
        num_classes: Classifier outputs; 0 for no head.
        global_pool: ``'token'`` (class token), ``'avg'`` (mean of patch tokens) or ``''`` (no pooling).
        embed_dim: Token width d.
        depth: Number of PACE blocks.
        num_heads: Number of subspaces K of each PACE block (and heads of the class attention); divides d.
        drop_rate: Dropout after the positional encoding and inside the class-attention blocks (as the reference).
        drop_path_rate: Stochastic-depth rate, the same for every PACE block.
        cls_attn_layers: Number of class-attention blocks.
        mlp_ratio: MLP width ratio of the class-attention blocks.
        norm_layer: Token norm (name or class); default LayerNorm with eps 1e-6.
        attn_layer: The PACE token mixer; built once with ``pace_kwargs`` and handed to every block.
        device: Factory device.
        dtype: Factory dtype.
        **pace_kwargs: The PACE settings, keywords of :class:`pace.layers.PACEAttention` (which holds their
            defaults): ``rank`` (r <= d / K), ``eps``, ``compress_form`` (``'full'``, the paper's projector, or
            ``'diag'``, the authors' code), ``projector``, ``positive_coeffs``, ``coeff_init``, ``sketch_seed``,
            ``sketch_schedule`` (``'reference'`` for the authors' runs), ``fused``.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 8,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        cls_attn_layers: int = 2,
        mlp_ratio: float = 4.0,
        norm_layer: str | Callable[..., nn.Module] | None = None,
        attn_layer: Callable[..., nn.Module] = PACEAttention,
        device=None,
        dtype=None,
        **pace_kwargs,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if patch_size not in _PATCH_SIZES:
            raise ValueError(f"PACEViT: patch_size must be one of {_PATCH_SIZES}, got {patch_size}")
        _check_pool(global_pool, has_class_token=True)
        norm_layer = get_norm_layer(norm_layer) if norm_layer is not None else REFERENCE_LAYER_NORM

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False

        self.patch_embed = ConvStem(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **dd
        )
        self.pos_embed = PositionalEncodingFourier(dim=embed_dim, **dd)
        self.pos_drop = nn.Dropout(drop_rate)
        # One configured token mixer for every block; the reference keeps one stochastic-depth rate for every
        # block (no linear ramp).
        block = partial(
            PACEBlock, attn_layer=partial(attn_layer, **pace_kwargs), drop_path=drop_path_rate, norm_layer=norm_layer
        )
        self.blocks = nn.ModuleList(block(embed_dim, num_heads, layer_idx=i, **dd) for i in range(depth))
        self.feature_info = [
            {"num_chs": embed_dim, "reduction": patch_size, "module": f"blocks.{i}"} for i in range(depth)
        ]

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.cls_attn_blocks = _class_attention_blocks(
            embed_dim, num_heads, cls_attn_layers, mlp_ratio=mlp_ratio, drop_rate=drop_rate, norm_layer=norm_layer, **dd
        )
        self.norm = norm_layer(embed_dim, **dd)
        self.head = _classifier(embed_dim, num_classes, **dd)

        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_linear)

    # ----------------------------------------------------------------------------------------------------------
    # initialisation

    @torch.no_grad()
    def init_weights(self) -> None:
        """Re-initialise every parameter and buffer (for a model materialised with ``to_empty`` from ``meta``)."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        for blk in self.cls_attn_blocks or ():
            blk.gamma1.fill_(_CLS_ATTN_ETA)
            blk.gamma2.fill_(_CLS_ATTN_ETA)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_linear)

    # ----------------------------------------------------------------------------------------------------------
    # timm model contract

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names (fnmatch patterns) excluded from weight decay: the class token and the per-layer scalars."""
        names = {"blocks.*.attn.alpha", "blocks.*.attn.beta", "blocks.*.attn.compress.tau"}
        if self.cls_token is not None:
            names.add("cls_token")
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise lr decay: embedding, each PACE block, class attention + norm, head."""
        return {
            "stem": r"^cls_token|^pos_embed|^patch_embed",
            "blocks": r"^blocks\.(\d+)",
            "cls_attn_blocks": [(r"^cls_attn_blocks\.(\d+)", None), (r"^norm", (99999,))],
        }

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        per_forward = sorted(
            {m.sketch_schedule for m in self.modules() if isinstance(m, SketchedModule)} & _PER_FORWARD
        )
        if enable and per_forward:
            # The recomputed forward would draw the next forward's sketch and give wrong gradients.
            raise ValueError(
                f"PACEViT: gradient checkpointing cannot be combined with sketch_schedule={per_forward[0]!r}"
            )
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier head."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head, keeping the model's device, dtype and train/eval mode.

        Args:
            num_classes: New number of classes; 0 removes the head.
            global_pool: New pooling (``'token'``, ``'avg'``, ``''``); None keeps the current one.
        """
        if global_pool is not None:
            _check_pool(global_pool, has_class_token=self.cls_token is not None)
            self.global_pool = global_pool
        self.num_classes = num_classes
        dd = get_device_dtype(self)
        self.head = _classifier(self.num_features, num_classes, **dd)
        _init_linear(self.head)
        self.head.train(self.training)

    # ----------------------------------------------------------------------------------------------------------
    # PACE-specific controls

    def compile_blocks(self, mode: str | None = None, **kwargs) -> None:
        """Compile each PACE and class-attention block in place (regional compilation), leaving the rest eager.

        All PACE blocks run the same code, so they share one compiled frame (their parameters and sketches are
        graph inputs): the model compiles about as fast as one block. With ``mode="reduce-overhead"`` each block
        runs as a CUDA graph; :meth:`set_epoch` redraws the sketches in place (same buffers, same addresses), so
        the graphs stay valid across epochs. State-dict keys do not change (``nn.Module.compile``).

        Args:
            mode: A ``torch.compile`` mode (``None``, ``"reduce-overhead"``, ``"max-autotune"``, ...).
            **kwargs: Further ``torch.compile`` arguments (``fullgraph``, ``dynamic``, ``backend``, ...).
        """
        # Sketches for the nominal grid drawn now, eagerly: the first compiled forward then reads stored buffers.
        for module in self.blocks.modules():
            if isinstance(module, SketchedModule):
                module.store_sketch(self.patch_embed.num_patches)
        for blk in [*self.blocks, *(self.cls_attn_blocks or [])]:
            blk.compile(mode=mode, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Redraw every block's sketches for ``epoch`` (same result on every rank)."""
        for blk in self.blocks:
            blk.set_epoch(epoch)

    @property
    def compress_form(self) -> str:
        """The Compress form of the PACE blocks, ``'full'`` (paper) or ``'diag'`` (authors' code); assign to switch
        every block (each block's ``attn.compress_form``, checked by its Compress operator)."""
        return self.blocks[0].attn.compress_form

    @compress_form.setter
    def compress_form(self, form: str) -> None:
        for blk in self.blocks:
            blk.attn.compress_form = form

    @property
    def positive_coeffs(self) -> bool:
        """Whether the blocks store α and β as softplus-raw values."""
        return self.blocks[0].attn.positive_coeffs

    # ----------------------------------------------------------------------------------------------------------
    # forward

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x, (H, W) = self.patch_embed(x)  # (B, N, C)
        # The encoding is computed for this grid, so any resolution that the stem divides evenly works.
        pos = self.pos_embed(1, H, W).flatten(2).transpose(1, 2)  # (1, N, C)
        return self.pos_drop(x + pos), (H, W)

    def _run_block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing:
            return checkpoint(blk, x)
        return blk(x)

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """Prepend the class token and run the class-attention blocks.

        Args:
            x: Patch tokens (B, N, C).

        Returns:
            Tokens (B, 1 + N, C), class token first.
        """
        x = self._prepend_cls(x)
        for blk in self.cls_attn_blocks:
            x = self._run_block(blk, x)
        return x

    def _prepend_cls(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (B, 1 + N, C)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the final norm.

        Args:
            x: Images (B, in_chans, H, W).

        Returns:
            (B, 1 + N, C) with the class token first, or (B, N, C) once the class token has been pruned.
        """
        x, _ = self._embed(x)
        for blk in self.blocks:
            x = self._run_block(blk, x)
        if self.cls_attn_blocks is not None:
            x = self.forward_cls(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the tokens and apply the head.

        Args:
            x: Output of :meth:`forward_features`.
            pre_logits: Return the pooled features instead of the logits.

        Returns:
            (B, C) pooled features, (B, num_classes) logits, or the unpooled tokens when ``global_pool=''``.
        """
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for images (B, in_chans, H, W).

        With ``global_pool='token'`` only the class token reaches the head, so the last class-attention block's
        token norm and MLP and the final norm run on the class token alone (same output as
        ``forward_head(forward_features(x))``, without a norm over every patch token).
        """
        if self.global_pool != "token" or not self.cls_attn_blocks:
            return self.forward_head(self.forward_features(x))
        x, _ = self._embed(x)
        for blk in self.blocks:
            x = self._run_block(blk, x)
        x = self._prepend_cls(x)
        for blk in self.cls_attn_blocks[:-1]:
            x = self._run_block(blk, x)
        last = self.cls_attn_blocks[-1]
        cls = checkpoint(last, x, True) if self.grad_checkpointing else last(x, class_token_only=True)  # (B, 1, C)
        return self.head(self.norm(cls[:, 0]))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward that also returns the outputs of selected PACE blocks.

        Args:
            x: Images (B, in_chans, H, W).
            indices: Last n blocks if int, all if None, these block indices if a sequence.
            norm: Apply the final norm to the intermediates.
            stop_early: Skip the blocks after the last selected one.
            output_fmt: ``'NCHW'`` (B, C, H', W') or ``'NLC'`` (B, N, C) intermediates.
            intermediates_only: Return only the intermediates.

        Returns:
            The intermediates, or (final features as :meth:`forward_features`, intermediates).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"PACEViT: output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B = x.shape[0]
        x, (H, W) = self._embed(x)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = self._run_block(blk, x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        if output_fmt == "NCHW":
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if intermediates_only:
            return intermediates
        if self.cls_attn_blocks is not None:
            x = self.forward_cls(x)
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the blocks after the last selected one (and the class attention + head, and the norm if asked).

        Args:
            indices: Blocks to keep features of, as in :meth:`forward_intermediates`.
            prune_norm: Replace the final norm with identity.
            prune_head: Remove the class token, the class-attention blocks and the classifier.

        Returns:
            The absolute block indices taken.
        """
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.cls_attn_blocks = None
            self.cls_token = None
            self.num_prefix_tokens = 0
            self.reset_classifier(0, "")
        return take_indices

    @torch.no_grad()
    def forward_memberships(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Subspace memberships π of every PACE block's input, as maps for visualisation.

        Args:
            x: Images (B, in_chans, H, W).

        Returns:
            One (B, K, H', W') tensor per block; it sums to 1 over K.
        """
        B = x.shape[0]
        x, (H, W) = self._embed(x)
        maps = []
        for blk in self.blocks:
            pi = blk.memberships(x)  # (B, N, K)
            maps.append(pi.transpose(1, 2).reshape(B, -1, H, W))  # (B, K, H', W')
            x = blk(x)
        return maps


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
