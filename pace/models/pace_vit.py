"""PACE-ViT: a conv-stem vision transformer whose token mixers are PACE blocks, registered with timm.

Layout (the reference network of the PACEAttention paper): conv stem with BatchNorm, Fourier positional encoding,
``depth`` PACE blocks (no MLP), a class token with two class-attention blocks, final norm, linear head.

References:
    https://github.com/SHIELD-SKY/PACEAttention (model/ECAttention.py, the authors' reference network)
    https://github.com/facebookresearch/xcit (conv patch embedding, Fourier encoding, class attention)
"""

import logging
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import get_device_dtype, get_norm_layer, trunc_normal_
from timm.models import (
    build_model_with_cfg,
    checkpoint,
    generate_default_cfgs,
    register_model,
    register_notrace_module,
)
from timm.models._features import feature_take_indices
from timm.models.xcit import ClassAttentionBlock, PositionalEncodingFourier
from torch import nn

from pace.layers import COMPRESS_FORMS, ConvStem, PACEBlock

__all__ = ["PACEViT", "checkpoint_filter_fn"]

_logger = logging.getLogger(__name__)

_PATCH_SIZES = (4, 8, 16)
_GLOBAL_POOLS = ("", "avg", "token")
_CLS_ATTN_ETA = 1.0  # per-channel layer-scale init of the class-attention blocks

# A block picks its sketch by token count (Python control flow), so torch.fx keeps it as one leaf call.
register_notrace_module(PACEBlock)


def _check_pool(global_pool: str, has_class_token: bool) -> None:
    # timm's tooling (and its generic tests) expects AssertionError for an unsupported pool, so raise exactly that.
    if global_pool not in _GLOBAL_POOLS:
        raise AssertionError(f"PACEViT: global_pool must be one of {_GLOBAL_POOLS}, got {global_pool!r}")
    if global_pool == "token" and not has_class_token:
        raise AssertionError("PACEViT: global_pool='token' needs the class token, which was pruned")


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
        rank: Sketch rank r per subspace; needs r <= d / K.
        eps: Ridge ε of the Cholesky basis.
        compress_form: ``'full'`` (the paper's projector) or ``'diag'`` (the authors' code).
        projector: ``'ridge'`` (soft projector, as the reference) or ``'exact'``.
        positive_coeffs: Keep α and β positive through softplus.
        coeff_init: Initial α and β.
        drop_rate: Dropout after the positional encoding and inside the class-attention blocks (as the reference).
        drop_path_rate: Stochastic-depth rate, the same for every PACE block.
        cls_attn_layers: Number of class-attention blocks.
        mlp_ratio: MLP width ratio of the class-attention blocks.
        sketch_seed: Seed of the deterministic Gaussian sketches (same on every rank).
        sketch_schedule: When sketches are redrawn: ``'epoch'``, ``'step'``, ``'fixed'`` or ``'reference'`` (the
            authors' runs: one sketch in epoch 0, then a fresh one every training forward; see ``SketchedModule``).
        norm_layer: Token norm (name or class); default LayerNorm with eps 1e-6.
        device: Factory device.
        dtype: Factory dtype.
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
        rank: int = 20,
        eps: float = 0.01,
        compress_form: str = "full",
        projector: str = "ridge",
        positive_coeffs: bool = False,
        coeff_init: float = 0.1,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        cls_attn_layers: int = 2,
        mlp_ratio: float = 4.0,
        sketch_seed: int = 0,
        sketch_schedule: str = "epoch",
        norm_layer: str | Callable[..., nn.Module] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if patch_size not in _PATCH_SIZES:
            raise ValueError(f"PACEViT: patch_size must be one of {_PATCH_SIZES}, got {patch_size}")
        _check_pool(global_pool, has_class_token=True)
        norm_layer = get_norm_layer(norm_layer) if norm_layer is not None else partial(nn.LayerNorm, eps=1e-6)

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.compress_form = compress_form
        self.positive_coeffs = positive_coeffs
        self.sketch_schedule = sketch_schedule
        self.grad_checkpointing = False

        self.patch_embed = ConvStem(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **dd
        )
        self.pos_embed = PositionalEncodingFourier(dim=embed_dim, **dd)
        self.pos_drop = nn.Dropout(drop_rate)
        # The reference keeps one stochastic-depth rate for every block (no linear ramp).
        self.blocks = nn.ModuleList(
            PACEBlock(
                embed_dim,
                num_heads,
                rank=rank,
                eps=eps,
                compress_form=compress_form,
                projector=projector,
                positive_coeffs=positive_coeffs,
                coeff_init=coeff_init,
                drop_path=drop_path_rate,
                norm_layer=norm_layer,
                layer_idx=i,
                sketch_seed=sketch_seed,
                sketch_schedule=sketch_schedule,
                **dd,
            )
            for i in range(depth)
        )
        self.feature_info = [
            {"num_chs": embed_dim, "reduction": patch_size, "module": f"blocks.{i}"} for i in range(depth)
        ]

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.cls_attn_blocks = nn.ModuleList(
            ClassAttentionBlock(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                proj_drop=drop_rate,
                norm_layer=norm_layer,
                eta=_CLS_ATTN_ETA,
                tokens_norm=True,
                **dd,
            )
            for _ in range(cls_attn_layers)
        )
        self.norm = norm_layer(embed_dim, **dd)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

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
        if enable and self.sketch_schedule in ("step", "reference"):
            # The recomputed forward would draw the next forward's sketch and give wrong gradients.
            raise ValueError(
                f"PACEViT: gradient checkpointing cannot be combined with sketch_schedule={self.sketch_schedule!r}"
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
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
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
        for blk in [*self.blocks, *(self.cls_attn_blocks or [])]:
            blk.compile(mode=mode, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Redraw every block's sketches for ``epoch`` (same result on every rank)."""
        for blk in self.blocks:
            blk.set_epoch(epoch)

    def set_compress_form(self, form: str) -> None:
        """Switch every block's Compress operator between ``'full'`` (paper) and ``'diag'`` (authors' code)."""
        if form not in COMPRESS_FORMS:
            raise ValueError(f"PACEViT: compress_form must be one of {COMPRESS_FORMS}, got {form!r}")
        for blk in self.blocks:
            blk.set_compress_form(form)
        self.compress_form = form

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

    def _class_token_of_last_block(self, x: torch.Tensor) -> torch.Tensor:
        """The class token (B, 1, C) after the last class-attention block, computing nothing else.

        timm's block norms every token after the attention (``tokens_norm``) and returns the patch tokens too;
        only the class token depends on its attention, and norm, MLP and residual are per token, so computing them
        for the class token alone gives the same numbers.
        """
        blk = self.cls_attn_blocks[-1]
        cls = x[:, :1] + blk.drop_path1(blk.gamma1 * blk.attn(blk.norm1(x)))  # class attention: (B, 1, C)
        cls = blk.norm2(cls)  # normed with or without tokens_norm
        return cls + blk.drop_path2(blk.gamma2 * blk.mlp(cls))

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
        if self.grad_checkpointing:
            cls = checkpoint(self._class_token_of_last_block, x)
        else:
            cls = self._class_token_of_last_block(x)
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


# --------------------------------------------------------------------------------------------------------------
# checkpoints

_REFERENCE_MARKERS = ("pos_embeder.", ".attn.expandoperator.", ".attn.compressoperator.")
_WRAPPER_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")
_PREFIXES = ("module.", "_orig_mod.")


def _unwrap(state_dict: dict) -> dict:
    # Training checkpoints nest the weights; the raw weights win when a file holds both, because the authors
    # evaluate, select and fine-tune from `model` (PACE_SPEC §6). pace.eval.load_model picks EMA on request.
    for key in _WRAPPER_KEYS:
        inner = state_dict.get(key)
        if isinstance(inner, dict) and inner:
            return _unwrap(inner)
    out = {}
    for k, v in state_dict.items():
        while k.startswith(_PREFIXES):  # DDP and torch.compile wrappers, nested in either order
            k = k.split(".", 1)[1]
        if k != "n_averaged":  # torch.optim.swa_utils.AveragedModel bookkeeping
            out[k] = v
    return out


def _softplus_inverse(y: torch.Tensor, key: str) -> torch.Tensor:
    y64 = y.double()
    if not bool((y64 > 0).all()):
        raise ValueError(
            f"checkpoint_filter_fn: {key}={y.tolist()} is not positive, so it has no softplus-raw value; "
            "create the model with positive_coeffs=False to load this checkpoint"
        )
    return (y64 + torch.log(-torch.expm1(-y64))).to(y.dtype)  # log(exp(y) - 1), stable for large y


def _reference_key(k: str) -> str:
    k = k.replace("pos_embeder.", "pos_embed.")
    k = k.replace(".attn.expandoperator.Omega", ".attn.expand.sketch")
    k = k.replace(".attn.compressoperator.Omega", ".attn.compress.sketch")
    k = k.replace(".attn.compressoperator.Us", ".attn.compress.subspaces")
    k = k.replace(".attn.compressoperator.temperature", ".attn.compress.tau")
    if k.startswith("blocks."):
        k = k.replace(".norm1.", ".norm.")
    return k


def _convert_reference(state_dict: dict, model: nn.Module) -> dict:
    positive = model.positive_coeffs
    out = {}
    for k, v in state_dict.items():
        if k.startswith("cls_attn_blocks.") and ".attn.qkv." in k:
            # timm's class attention keeps q, k and v as separate projections.
            for name, part in zip("qkv", v.reshape(3, -1, *v.shape[1:])):
                out[k.replace(".attn.qkv.", f".attn.{name}.")] = part
            continue
        if k.startswith("blocks.") and k.rsplit(".", 1)[-1] in ("gamma1", "gamma2", "_gamma1_raw", "_gamma2_raw"):
            prefix, name = k.rsplit(".", 1)
            # The reference adds gamma1 * Expand and subtracts gamma2 * Compress: gamma1 is α, gamma2 is β.
            ours = f"{prefix}.attn.{'alpha' if '1' in name else 'beta'}"
            stored_raw = name.startswith("_")
            if stored_raw and not positive:
                v = F.softplus(v.double()).to(v.dtype)
            elif positive and not stored_raw:
                v = _softplus_inverse(v, k)
            out[ours] = v.reshape(())
            continue
        k = _reference_key(k)
        if k.endswith(".attn.compress.tau"):
            v = v.reshape(())
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: dict, model: PACEViT) -> dict:
    """Convert a checkpoint to this model's state-dict layout.

    Accepts this project's state dicts (bare, or under ``'model'``, ``'state_dict'``, ``'model_ema'``,
    ``'state_dict_ema'``, with DDP / torch.compile prefixes) and the authors' DeiT-style checkpoints (their key
    names, ``gamma1/gamma2`` or softplus ``_gamma1_raw/_gamma2_raw``, ``Omega`` sketches, ``Us``, a (1,)
    ``temperature``). For the authors' format, α/β are converted exactly to the model's coefficient mode and the
    model is switched to the authors' Compress form (``'diag'``), which is what their code computes.

    Of a file holding both, the raw ``'model'`` weights are taken (what the authors evaluate and fine-tune from);
    for the EMA weights pass ``checkpoint['model_ema']`` or use ``pace.eval.load_model(..., weights='ema')``.

    Args:
        state_dict: Loaded checkpoint (any of the layouts above).
        model: The model the weights are for.

    Returns:
        A state dict with this model's key names.
    """
    state_dict = _unwrap(state_dict)
    if not any(marker in k for k in state_dict for marker in _REFERENCE_MARKERS):
        return state_dict
    out = _convert_reference(state_dict, model)
    if getattr(model, "compress_form", "diag") != "diag":
        _logger.warning(
            "Loaded a checkpoint in the authors' PACEAttention format: switching the model's Compress operator "
            "from %r to the authors' diagonal form ('diag') so their outputs are reproduced "
            "(call model.set_compress_form('full') to use the paper's projector instead).",
            model.compress_form,
        )
        model.set_compress_form("diag")
    return out


# --------------------------------------------------------------------------------------------------------------
# registry


def _create_pace_vit(variant: str, pretrained: bool = False, **kwargs) -> PACEViT:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        PACEViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg={"out_indices": out_indices, "feature_cls": "getter"},
        **kwargs,
    )


def _cfg(**kwargs) -> dict:
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj.0.0",
        "classifier": "head",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "pace_vit_test": _cfg(input_size=(3, 64, 64)),
        "pace_vit_tiny_patch4_32": _cfg(
            input_size=(3, 32, 32),
            num_classes=10,
            crop_pct=1.0,
            mean=(0.4914, 0.4822, 0.4465),  # CIFAR-10
            std=(0.2470, 0.2435, 0.2616),
        ),
        "pace_vit_tiny_patch8_224": _cfg(),
        "pace_vit_small_patch8_224": _cfg(),
        "pace_vit_tiny_patch16_224": _cfg(),
        "pace_vit_small_patch16_224": _cfg(),
        "pace_vit_medium_patch16_224": _cfg(),
        "pace_vit_large_patch16_224": _cfg(),
    }
)


@register_model
def pace_vit_test(pretrained: bool = False, **kwargs) -> PACEViT:
    """Tiny PACE-ViT for tests (64 px, patch 8, d 64, 4 blocks, 2 subspaces of rank 8)."""
    model_args = {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2, "rank": 8}
    return _create_pace_vit("pace_vit_test", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def pace_vit_tiny_patch4_32(pretrained: bool = False, **kwargs) -> PACEViT:
    """PACE-ViT-Tiny for 32 px images (CIFAR): patch 4, 8x8 tokens."""
    model_args = {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 12, "num_heads": 4}
    return _create_pace_vit("pace_vit_tiny_patch4_32", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def pace_vit_tiny_patch8_224(pretrained: bool = False, **kwargs) -> PACEViT:
    """PACE-ViT-Tiny/8 (d 192, 12 blocks, 4 subspaces)."""
    model_args = {"patch_size": 8, "embed_dim": 192, "depth": 12, "num_heads": 4}
    return _create_pace_vit("pace_vit_tiny_patch8_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def pace_vit_small_patch8_224(pretrained: bool = False, **kwargs) -> PACEViT:
    """PACE-ViT-Small/8 (d 384, 12 blocks, 8 subspaces)."""
    model_args = {"patch_size": 8, "embed_dim": 384, "depth": 12, "num_heads": 8}
    return _create_pace_vit("pace_vit_small_patch8_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def pace_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> PACEViT:
    """PACE-ViT-Tiny/16 (d 192, 12 blocks, 4 subspaces; reference ECAttention_tiny_layer12_p16)."""
    model_args = {"patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 4}
    return _create_pace_vit("pace_vit_tiny_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def pace_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> PACEViT:
    """PACE-ViT-Small/16 (d 384, 12 blocks, 8 subspaces; reference ECAttention_small_layer12_p16)."""
    model_args = {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 8}
    return _create_pace_vit("pace_vit_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def pace_vit_medium_patch16_224(pretrained: bool = False, **kwargs) -> PACEViT:
    """PACE-ViT-Medium/16 (d 512, 24 blocks, 8 subspaces; reference ECAttention_medium_layer24_p16)."""
    model_args = {"patch_size": 16, "embed_dim": 512, "depth": 24, "num_heads": 8}
    return _create_pace_vit("pace_vit_medium_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def pace_vit_large_patch16_224(pretrained: bool = False, **kwargs) -> PACEViT:
    """PACE-ViT-Large/16 (d 1024, 24 blocks, 16 subspaces; reference ECAttention_large_layer24_p16_d1024)."""
    model_args = {"patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16}
    return _create_pace_vit("pace_vit_large_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))
