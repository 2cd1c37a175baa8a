"""The PACE block's LayerNorm as the fused mixer's prologue and epilogue, torch custom ops: Triton where it runs.

``layer_norm_cast``: the normalised tokens written once, in the matrix-product dtype (the only copy the mixer's
products read), with the per-token mean and reciprocal standard deviation; where PyTorch writes the float32 norm and
then its low-precision copy. ``layer_norm_backward``: the input's gradient from a low-precision cotangent, with the
block's residual gradient added in the same pass, and the weight's and bias's gradients. The ops have no autograd
formula: ``pace.layers.mixer`` calls them inside its own ``autograd.Function``. Backend per call as in
``pace.kernels._dispatch``.
"""

import torch
from torch import Tensor

from pace.kernels import _dispatch

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def layer_norm_cast_reference(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """PyTorch ``(LayerNorm(x).to(dtype), μ, rstd)`` over the last dimension, computed in (at least) float32.

    Args:
        x: Tokens (..., C).
        weight: Scale (C,).
        bias: Shift (C,).
        eps: ε inside the square root.
        dtype: The normalised tokens' dtype.

    Returns:
        The normalised tokens in ``dtype`` (x's shape), and μ and rstd = 1/√(var + ε) (x's shape without its last
        dimension) in float32 (float64 for float64 x).
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    C = x.shape[-1]
    y, mean, rstd = torch.native_layer_norm(x.to(acc), (C,), weight.to(acc), bias.to(acc), eps)
    return y.to(dtype), mean.squeeze(-1), rstd.squeeze(-1)


@torch.library.custom_op("pace::layer_norm_cast", mutates_args=())
def _layer_norm_cast_op(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    supported = x.dtype in _TRITON_DTYPES and dtype in _TRITON_DTYPES
    supported = supported and weight.dtype == bias.dtype == torch.float32
    module = _dispatch.triton_module(x, "_triton_norm") if supported else None
    if module is None:
        y, mean, rstd = layer_norm_cast_reference(x, weight, bias, eps, dtype)
        return y.contiguous(), mean.contiguous(), rstd.contiguous()
    C = x.shape[-1]
    y, mean, rstd = module.layer_norm_cast(x.reshape(-1, C), weight.contiguous(), bias.contiguous(), eps, dtype)
    return y.view(x.shape), mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


@_layer_norm_cast_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor, eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    acc = torch.promote_types(x.dtype, torch.float32)
    stats = x.new_empty(x.shape[:-1], dtype=acc)
    return x.new_empty(x.shape, dtype=dtype), stats, stats.clone()


def layer_norm_cast(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm over the last dimension written once in ``dtype``, with μ and rstd (custom op
    ``pace::layer_norm_cast``; no autograd).

    The Triton kernel (float32/bfloat16/float16 x and output, float32 weight and bias) reads x once, computes the
    statistics in fp32 in registers (two passes there, no cancellation), and writes the normalised tokens rounded
    to nearest even; elsewhere :func:`layer_norm_cast_reference`. The values are those of ``F.layer_norm`` in
    float32 followed by ``.to(dtype)``, up to fp32 summation order.

    Args:
        x: Tokens (..., C), contiguous.
        weight: Scale (C,).
        bias: Shift (C,).
        eps: ε inside the square root.
        dtype: The normalised tokens' dtype.

    Returns:
        ``(y, μ, rstd)``: y in ``dtype`` with x's shape; μ and rstd with x's shape less its last dimension, float32
        (float64 for float64 x).
    """
    C = x.shape[-1] if x.dim() else 0
    if x.dim() < 2 or weight.shape != (C,) or bias.shape != (C,):
        shapes = [tuple(t.shape) for t in (x, weight, bias)]
        raise ValueError(f"layer_norm_cast: x (..., C), weight (C,) and bias (C,) expected, got {shapes}")
    return _layer_norm_cast_op(x.contiguous(), weight, bias, float(eps), dtype)


def layer_norm_backward_reference(
    dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, residual_grad: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """PyTorch ``(∂L/∂x [+ residual_grad], ∂L/∂weight, ∂L/∂bias)`` of LayerNorm given ``dy = ∂L/∂y``, in (at least)
    float32 (ATen's LayerNorm backward). Arguments and results as :func:`layer_norm_backward`."""
    acc = torch.promote_types(x.dtype, torch.float32)
    C = x.shape[-1]
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(
        dy.to(acc), x.to(acc), (C,), mean.unsqueeze(-1).to(acc), rstd.unsqueeze(-1).to(acc), weight.to(acc),
        torch.zeros_like(weight, dtype=acc), [True, True, True],
    )  # fmt: skip
    if residual_grad is not None:
        dx = dx + residual_grad
    return dx.to(x.dtype), dw.to(weight.dtype), db.to(weight.dtype)


@torch.library.custom_op("pace::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(
    dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, residual_grad: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    tensors = (dy, x) if residual_grad is None else (dy, x, residual_grad)
    supported = all(t.dtype in _TRITON_DTYPES for t in tensors)
    supported = supported and all(t.dtype == torch.float32 for t in (mean, rstd, weight))
    module = _dispatch.triton_module(x, "_triton_norm") if supported else None
    if module is None:
        dx, dw, db = layer_norm_backward_reference(dy, x, mean, rstd, weight, residual_grad)
        return dx.contiguous(), dw, db
    C = x.shape[-1]
    flat = [t.contiguous().view(-1, C) for t in tensors]
    dx, dw, db = module.layer_norm_backward(
        flat[0], flat[1], mean.contiguous().view(-1), rstd.contiguous().view(-1), weight.contiguous(),
        flat[2] if residual_grad is not None else None,
    )  # fmt: skip
    return dx.view(x.shape), dw, db


@_layer_norm_backward_op.register_fake
def _(
    dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, residual_grad: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


def layer_norm_backward(
    dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, residual_grad: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm's backward, with a residual's cotangent added to the input's (custom op
    ``pace::layer_norm_backward``; no autograd).

    ``∂L/∂x = rstd·(w·dy − mean(w·dy) − x̂·mean(w·dy·x̂))`` per token, ``x̂ = (x − μ)·rstd``;
    ``∂L/∂w = Σ dy·x̂`` and ``∂L/∂b = Σ dy`` over the tokens. The Triton kernel (float32/bfloat16/float16 dy, x and
    residual cotangent; float32 statistics and weight) reads each once and writes ∂L/∂x once; a fixed number of
    programs sum the weight's and the bias's gradients in fp32, then one sum over programs, so the summation order
    does not depend on the GPU. Elsewhere :func:`layer_norm_backward_reference`.

    Args:
        dy: Cotangent of the normalised tokens (..., C), any float dtype.
        x: The tokens that were normalised, dy's shape.
        mean: Their μ from :func:`layer_norm_cast`, x's shape less its last dimension.
        rstd: Their rstd, the same shape.
        weight: Scale (C,).
        residual_grad: Optional cotangent added to ∂L/∂x (the block's residual path), x's shape.

    Returns:
        ``(∂L/∂x, ∂L/∂weight, ∂L/∂bias)``: the first in x's dtype, the others in weight's.
    """
    shapes_ok = dy.shape == x.shape and x.dim() >= 2 and mean.shape == rstd.shape == x.shape[:-1]
    shapes_ok = shapes_ok and weight.shape == x.shape[-1:]
    if not shapes_ok or (residual_grad is not None and residual_grad.shape != x.shape):
        given = (dy, x, mean, rstd, weight) + (() if residual_grad is None else (residual_grad,))
        raise ValueError(
            "layer_norm_backward: dy, x (..., C), mean, rstd (...), weight (C,) [and residual_grad (..., C)] "
            f"expected, got {[tuple(t.shape) for t in given]}"
        )
    return _layer_norm_backward_op(dy, x, mean, rstd, weight, residual_grad)
