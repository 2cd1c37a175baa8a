"""The fused PACE mixer's work between its matrix products (full Compress form) as torch custom ops: Triton where it
runs.

``mixer_memberships``: from ``a = x̂U`` and the Compress bases Q_k, per token and head ``c_k = a_kQ_k``,
``col_k = c_kQ_kᵀ``, the memberships π and ``z_k = π_k(a_k − col_k)``, Compress's update being ``−β zUᵀ``: the
products with Q_k run in registers, so that the mixer never forms the token-space bases ``U_kQ_k``.
``mixer_memberships_backward``: its backward, with the cotangents of the Expand coordinates ``x̂Q_e``. Each is one
pass over its (B, N, ·) tensors in the Triton kernel, where the PyTorch fallback takes about ten ops. The ops have no
autograd formula: ``pace.layers.mixer`` calls them inside its own ``autograd.Function``. ``cast_dot``: the
backward's prologue, the cotangent's low-precision copy and its dot product with the tokens (∂L/∂α) from one read of
each. ``expand_basis``: GEMM 1's right factor, the Expand basis ``Q_e = Y F_s``, in the matrix-product dtype, written
once from fp32-accurate products. Backend per call as in ``pace.kernels._dispatch``.
"""

import torch
from torch import Tensor

from pace.kernels import _dispatch

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _tiny(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny


def membership_backward(
    h: Tensor, pi: Tensor, sq: Tensor, g_pi: Tensor | None, tau: Tensor, beta: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of π = softmax_k(max(‖col_k‖², tiny)^½ / τ) where π also scales β's term, in PyTorch (both forms).

    Args:
        h: ∂(update)/∂π_k / β per token and head, (B, N, K), in the working dtype.
        pi: π from the forward.
        sq: ``‖col‖²`` from the forward.
        g_pi: π's cotangent, (B, N, K), or None for zero.
        tau: τ (0-dim).
        beta: β (0-dim).

    Returns:
        ``∂L/∂β``'s part ``Σ π h``, ``∂L/∂τ = −Σ ∂ℓ·‖col‖ / τ²`` and ``∂L/∂‖col‖²`` (B, N, K).
    """
    wd = h.dtype
    beta_part = (pi * h).sum()
    pi_bar = beta * h if g_pi is None else g_pi.to(wd) + beta * h
    # Softmax, then ℓ = max(‖col‖², tiny)^½ / τ.
    l_bar = pi * (pi_bar - (pi_bar * pi).sum(-1, keepdim=True))
    root = sq.clamp_min(_tiny(wd)).sqrt()
    tau_part = -(l_bar * root).sum() / tau.square()
    sq_bar = l_bar * (sq >= _tiny(wd)) / (2 * tau * root)  # (B, N, K)
    return beta_part, tau_part, sq_bar


def _head_products(a: Tensor, Q_c: Tensor) -> tuple[Tensor, Tensor]:
    """``a`` per head (B, N, K, p) and ``c_k = a_kQ_k`` (B, N, K, r), both in Q_c's dtype."""
    B, N, _ = a.shape
    K, p, _ = Q_c.shape[1:]
    a4 = a.view(B, N, K, p).to(Q_c.dtype)
    return a4, torch.einsum("bnkp,bkpr->bnkr", a4, Q_c)


def mixer_memberships_reference(a: Tensor, Q_c: Tensor, scalars: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """PyTorch ``(z, π, ‖col‖²)``, computed in Q_c's dtype.

    Args:
        a: ``x̂U``, shape (B, N, K·p).
        Q_c: Compress bases, shape (B, K, p, r), float32 or float64 (the work dtype).
        scalars: ``[τ, α, β]`` in Q_c's dtype.

    Returns:
        ``z = π ⊙ (a − col)`` in a's dtype (col_k = a_kQ_kQ_kᵀ), π and ``‖col‖²`` (B, N, K) in Q_c's dtype.
    """
    a4, c = _head_products(a, Q_c)
    col = torch.einsum("bnkr,bkpr->bnkp", c, Q_c)  # a_k through the soft projector Q_kQ_kᵀ
    sq = col.square().sum(-1)  # (B, N, K)
    root = sq.clamp_min(_tiny(sq.dtype)).sqrt()  # the clamp keeps the square root's gradient finite
    pi = torch.softmax(root / scalars[0], dim=-1)
    z = pi.unsqueeze(-1) * (a4 - col)
    return z.to(a.dtype).view(a.shape), pi, sq


def mixer_memberships_backward_reference(
    g_Qe: Tensor, P: Tensor, g_U: Tensor, a: Tensor, pi: Tensor, sq: Tensor, g_pi: Tensor | None, Q_c: Tensor,
    scalars: Tensor,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """PyTorch backward of :func:`mixer_memberships_reference` through π (z entering ``−β zUᵀ``, π an output): the
    cotangent of ‖col‖² and the scalar gradients' partial sums.

    Args:
        g_Qe: ``gQ_e``, shape (B, N, c_e) (g: the update's cotangent).
        P: ``x̂Q_e``, shape (B, N, c_e).
        g_U: ``gU``, shape (B, N, K·p).
        a: As in the forward.
        pi: π from the forward.
        sq: ``‖col‖²`` from the forward.
        g_pi: π's cotangent, (B, N, K), or None for zero.
        Q_c: As in the forward.
        scalars: ``[τ, α, β]``.

    Returns:
        ``∂L/∂‖col‖²`` (B, N, K) and the partial scalar gradients ``[−<gQ_e, x̂Q_e>, ∂L/∂β, ∂L/∂τ]``, in Q_c's dtype.
    """
    wd = Q_c.dtype
    tau, _, beta = scalars.unbind()
    alpha_part = -(g_Qe.to(wd) * P.to(wd)).sum()
    a4, c = _head_products(a, Q_c)
    gU4, gV = _head_products(g_U, Q_c)
    h = (gV * c).sum(-1) - (gU4 * a4).sum(-1)  # <gV_k, c_k> − <gU_k, a_k>
    beta_part, tau_part, sq_bar = membership_backward(h, pi, sq, g_pi, tau, beta)
    return sq_bar, torch.stack([alpha_part, beta_part, tau_part])


def mixer_heads_backward_reference(
    a: Tensor, g_U: Tensor, pi: Tensor, sq_bar: Tensor, Q_c: Tensor, scalars: Tensor
) -> tuple[Tensor, Tensor]:
    """PyTorch backward of :func:`mixer_memberships_reference` to a and Q_c, given ``∂L/∂‖col‖²``.

    Per token and head, ``W₁ = ∂L/∂c_k = βπ_k gU_kQ_k + 2 ∂‖col_k‖² c_kQ_kᵀQ_k`` and
    ``col̄_k = βπ_k gU_k + 2 ∂‖col_k‖² col_k``; then ``ā_k = W₁Q_kᵀ − βπ_k gU_k`` and
    ``Q̄_k = Σ_n a_kᵀW₁ + col̄_kᵀc_k``.

    Args:
        a: As in the forward.
        g_U: ``gU``, shape (B, N, K·p).
        pi: π from the forward.
        sq_bar: ``∂L/∂‖col‖²`` (:func:`mixer_memberships_backward_reference`).
        Q_c: As in the forward.
        scalars: ``[τ, α, β]``.

    Returns:
        ā in a's dtype and Q̄_c (B, K, p, r) in Q_c's dtype.
    """
    a4, c = _head_products(a, Q_c)
    gU4, gV = _head_products(g_U, Q_c)
    bpi, sqb = (scalars[2] * pi).unsqueeze(-1), sq_bar.unsqueeze(-1)
    w1 = bpi * gV + 2 * sqb * torch.einsum("bnkr,bkrs->bnks", c, Q_c.mT @ Q_c)  # c_k M_k, M_k = Q_kᵀQ_k
    a_bar = torch.einsum("bnkr,bkpr->bnkp", w1, Q_c) - bpi * gU4
    col_bar = bpi * gU4 + 2 * sqb * torch.einsum("bnkr,bkpr->bnkp", c, Q_c)
    Qc_bar = torch.einsum("bnkp,bnkr->bkpr", a4, w1) + torch.einsum("bnkp,bnkr->bkpr", col_bar, c)
    return a_bar.reshape(a.shape).to(a.dtype), Qc_bar


def _triton(a: Tensor, Q_c: Tensor):
    supported = a.dtype in _TRITON_DTYPES and Q_c.dtype == torch.float32
    return _dispatch.triton_module(a, "_triton_mixer") if supported else None


@torch.library.custom_op("pace::mixer_memberships", mutates_args=())
def _mixer_memberships_op(a: Tensor, Q_c: Tensor, scalars: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    module = _triton(a, Q_c)
    if module is None:
        return tuple(t.contiguous() for t in mixer_memberships_reference(a, Q_c, scalars))
    return module.mixer_memberships(a.contiguous(), Q_c.contiguous(), scalars.contiguous())


@_mixer_memberships_op.register_fake
def _(a: Tensor, Q_c: Tensor, scalars: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    B, N, _ = a.shape
    K = Q_c.shape[1]
    return a.new_empty(a.shape), Q_c.new_empty((B, N, K)), Q_c.new_empty((B, N, K))


@torch.library.custom_op("pace::mixer_memberships_backward", mutates_args=())
def _mixer_memberships_backward_op(
    g_Qe: Tensor, P: Tensor, g_U: Tensor, a: Tensor, pi: Tensor, sq: Tensor, g_pi: Tensor | None, Q_c: Tensor,
    scalars: Tensor,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    module = _triton(a, Q_c)
    args = (g_Qe, P, g_U, a, pi, sq, g_pi, Q_c, scalars)
    if module is None:
        return tuple(t.contiguous() for t in mixer_memberships_backward_reference(*args))
    return module.mixer_memberships_backward(*(None if t is None else t.contiguous() for t in args))


@_mixer_memberships_backward_op.register_fake
def _(g_Qe, P, g_U, a, pi, sq, g_pi, Q_c, scalars) -> tuple[Tensor, Tensor]:
    return Q_c.new_empty(pi.shape), Q_c.new_empty((3,))


@torch.library.custom_op("pace::mixer_heads_backward", mutates_args=())
def _mixer_heads_backward_op(
    a: Tensor, g_U: Tensor, pi: Tensor, sq_bar: Tensor, Q_c: Tensor, scalars: Tensor
) -> tuple[Tensor, Tensor]:
    module = _triton(a, Q_c)
    args = (a, g_U, pi, sq_bar, Q_c, scalars)
    if module is None:
        return tuple(t.contiguous() for t in mixer_heads_backward_reference(*args))
    return module.mixer_heads_backward(*(t.contiguous() for t in args))


@_mixer_heads_backward_op.register_fake
def _(a, g_U, pi, sq_bar, Q_c, scalars) -> tuple[Tensor, Tensor]:
    return a.new_empty(a.shape), Q_c.new_empty(Q_c.shape)


def _check(a: Tensor, Q_c: Tensor, scalars: Tensor) -> None:
    ok = a.dim() == 3 and Q_c.dim() == 4 and scalars.shape == (3,)
    ok = ok and a.shape[0] == Q_c.shape[0] and a.shape[2] == Q_c.shape[1] * Q_c.shape[2]
    if not ok:
        raise ValueError(
            "mixer_memberships: a (B, N, K·p), Q_c (B, K, p, r) and scalars (3,) expected, got "
            f"{tuple(a.shape)}, {tuple(Q_c.shape)}, {tuple(scalars.shape)}"
        )


def mixer_memberships(a: Tensor, Q_c: Tensor, scalars: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The full Compress form's memberships and GEMM 2's left factor (custom op ``pace::mixer_memberships``).

    Per token and head: ``c_k = a_kQ_k``, ``col_k = c_kQ_kᵀ`` (a_k through the ridge projector Q_kQ_kᵀ,
    head k's coordinates of ``x̂U_kQ_kQ_kᵀU_kᵀ``), ``π = softmax_k(max(‖col_k‖², tiny)^½ / τ)`` and
    ``z_k = π_k(a_k − col_k)``, so that Compress's update is ``−β zUᵀ``: no (B, d, K·r) basis ``V_k = U_kQ_k``
    and no product with it. The Triton kernel (CUDA, or the interpreter when forced; float32 Q_c) reads a once,
    forms c and col in registers (3xTF32 products, fp32-accurate) and rounds z once; the fallback is
    :func:`mixer_memberships_reference`.

    Args:
        a: ``x̂U``, shape (B, N, K·p).
        Q_c: Compress bases, shape (B, K, p, r).
        scalars: ``[τ, α, β]`` in Q_c's dtype.

    Returns:
        ``(z, π, ‖col‖²)``: z in a's dtype, π and ‖col‖² (B, N, K) in Q_c's dtype.
    """
    _check(a, Q_c, scalars)
    return _mixer_memberships_op(a, Q_c, scalars)


def mixer_memberships_backward(
    g_Qe: Tensor, P: Tensor, g_U: Tensor, a: Tensor, pi: Tensor, sq: Tensor, g_pi: Tensor | None, Q_c: Tensor,
    scalars: Tensor,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Backward of :func:`mixer_memberships` through π: ``∂L/∂‖col‖²`` and the scalar gradients' partial sums
    (custom op ``pace::mixer_memberships_backward``; the rest of the backward is :func:`mixer_heads_backward`).

    Arguments and results as :func:`mixer_memberships_backward_reference`. The Triton kernel runs one program per
    (image, 16 tokens), since the softmax over the heads needs every head's ``h_k`` of a token; it reads each input
    once, forms c_k and gU_kQ_k in registers and sums the partial sums per program in fp32, then over programs.
    ``g_pi`` may be None (π unused by the loss: a zero cotangent that is never written).
    """
    _check(a, Q_c, scalars)
    B, N, K = a.shape[0], a.shape[1], Q_c.shape[1]
    g_pi_shape = (B, N, K) if g_pi is None else g_pi.shape
    expand = P.dim() == 3 and P.shape[:2] == (B, N) and P.shape[2] == K * Q_c.shape[3] and g_Qe.shape == P.shape
    if not expand or g_U.shape != a.shape or not pi.shape == sq.shape == g_pi_shape == (B, N, K):
        raise ValueError(
            "mixer_memberships_backward: cotangent or saved shapes do not match the forward's (c_e = K·r Expand "
            f"columns): g_Qe {tuple(g_Qe.shape)}, P {tuple(P.shape)}, g_U {tuple(g_U.shape)}, π {tuple(pi.shape)}"
        )
    return _mixer_memberships_backward_op(g_Qe, P, g_U, a, pi, sq, g_pi, Q_c, scalars)


def mixer_heads_backward(
    a: Tensor, g_U: Tensor, pi: Tensor, sq_bar: Tensor, Q_c: Tensor, scalars: Tensor
) -> tuple[Tensor, Tensor]:
    """Backward of :func:`mixer_memberships` to a and to the Compress bases (custom op ``pace::mixer_heads_backward``),
    given ``∂L/∂‖col‖²`` from :func:`mixer_memberships_backward`.

    Arguments and results as :func:`mixer_heads_backward_reference`. The Triton kernel runs one program per (image,
    head) over all the tokens, 16 at a time in a fixed order: it writes ā once and sums Q̄_k in fp32 registers, so that
    no per-token factor of Q̄_k is written and no product over the tokens runs outside it (3xTF32 products, fp32
    arithmetic, one rounding of ā).
    """
    _check(a, Q_c, scalars)
    if g_U.shape != a.shape or not pi.shape == sq_bar.shape == (a.shape[0], a.shape[1], Q_c.shape[1]):
        raise ValueError(
            f"mixer_heads_backward: g_U {tuple(g_U.shape)} must be a's {tuple(a.shape)}, π {tuple(pi.shape)} and "
            f"∂L/∂‖col‖² {tuple(sq_bar.shape)} (B, N, K)"
        )
    return _mixer_heads_backward_op(a, g_U, pi, sq_bar, Q_c, scalars)


def cast_dot_reference(
    g: Tensor, x: Tensor, dtype: torch.dtype, scale: Tensor | None = None
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """PyTorch ``(g'.to(dtype), <g', x>)`` with ``g' = g`` or g scaled per batch entry, the dot product in (at least)
    float32.

    Args:
        g: Any tensor, batch first.
        x: A tensor of g's shape.
        dtype: The copy's dtype.
        scale: Optional per-batch-entry scales of g, shape (g.shape[0],).

    Returns:
        The copy (a new tensor) and a 0-dim dot product in float32 (float64 for float64 input).
    """
    acc = torch.promote_types(g.dtype, torch.float32)
    if scale is not None:
        g = g * scale.to(g.dtype).view(-1, *[1] * (g.dim() - 1))
    copy = g.to(dtype, copy=True)
    return copy, torch.dot(g.reshape(-1).to(acc), x.reshape(-1).to(acc))


@torch.library.custom_op("pace::cast_dot", mutates_args=())
def _cast_dot_op(g: Tensor, x: Tensor, dtype: torch.dtype, scale: Tensor | None) -> tuple[Tensor, Tensor]:
    supported = g.dtype == torch.float32 and x.dtype in _TRITON_DTYPES and dtype in (torch.bfloat16, torch.float16)
    module = _dispatch.triton_module(g, "_triton_mixer") if supported else None
    if module is None:
        copy, dot = cast_dot_reference(g, x, dtype, scale)
        return copy.contiguous(), dot
    return module.cast_dot(g.contiguous(), x.contiguous(), dtype, scale=scale)


@_cast_dot_op.register_fake
def _(g: Tensor, x: Tensor, dtype: torch.dtype, scale: Tensor | None) -> tuple[Tensor, Tensor]:
    return g.new_empty(g.shape, dtype=dtype), g.new_empty((), dtype=torch.promote_types(g.dtype, torch.float32))


def cast_dot(g: Tensor, x: Tensor, dtype: torch.dtype, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``g`` in ``dtype`` and ``<g, x>`` from one read of each (custom op ``pace::cast_dot``; no autograd); with
    ``scale``, ``g`` is first multiplied by its batch entry's scale (a branch's stochastic depth).

    The fused mixer's backward needs the cotangent g in the matrix-product dtype and ``<g, x>`` (a term of ∂L/∂α).
    The Triton kernel (float32 g, float32/bfloat16/float16 x, bfloat16/float16 copy) reads both once, writes the
    copy once (rounded to nearest even) and sums the products in fp32 per block, then over blocks; elsewhere
    :func:`cast_dot_reference`.

    Args:
        g: Cotangent, any shape.
        x: Tokens, g's shape (the mixer passes its bf16 copy).
        dtype: The copy's dtype.
        scale: Optional scales, shape (g.shape[0],).

    Returns:
        ``(copy, dot)``: the copy in ``dtype`` (contiguous, never g itself), the dot product 0-dim in float32
        (float64 for float64 input).
    """
    if g.shape != x.shape:
        raise ValueError(f"cast_dot: g and x must have one shape, got {tuple(g.shape)} and {tuple(x.shape)}")
    if scale is not None and (g.dim() == 0 or tuple(scale.shape) != (g.shape[0],)):
        raise ValueError(f"cast_dot: scale of shape (g.shape[0],) expected, got {tuple(scale.shape)}")
    return _cast_dot_op(g, x, dtype, scale)


def expand_basis_reference(Y: Tensor, F_s: Tensor, dtype: torch.dtype) -> Tensor:
    """PyTorch ``Q_e = Y F_s``: the product in F_s's dtype, then one conversion.

    Args:
        Y: Expand sketches, shape (B, d, c) (any strides), in F_s's dtype or narrower (converted).
        F_s: Their scaled factors ``D⁻¹F``, shape (B, c, c).
        dtype: The result's dtype.

    Returns:
        Q_e, shape (B, d, c), in ``dtype``.
    """
    return (Y.to(F_s.dtype) @ F_s).to(dtype)


@torch.library.custom_op("pace::expand_basis", mutates_args=())
def _expand_basis_op(Y: Tensor, F_s: Tensor, dtype: torch.dtype) -> Tensor:
    supported = F_s.dtype == torch.float32 and Y.dtype in _TRITON_DTYPES and dtype in _TRITON_DTYPES
    module = _dispatch.triton_module(Y, "_triton_mixer") if supported else None
    if module is None:
        return expand_basis_reference(Y, F_s, dtype).contiguous()
    return module.expand_basis(Y, F_s.contiguous(), dtype)


@_expand_basis_op.register_fake
def _(Y: Tensor, F_s: Tensor, dtype: torch.dtype) -> Tensor:
    return Y.new_empty(Y.shape, dtype=dtype)


def expand_basis(Y: Tensor, F_s: Tensor, dtype: torch.dtype) -> Tensor:
    """GEMM 1's right factor, the Expand basis ``Q_e = Y F_s``, in ``dtype`` (custom op ``pace::expand_basis``; no
    autograd).

    Q_e must be formed to fp32 accuracy and only then rounded (GPU_PERF.md §2b). The Triton kernel (float32 F_s;
    Y in float32 or, read as it is and converted in registers, bfloat16/float16) computes each tile with 3xTF32
    products and writes it once, rounded; the fallback (:func:`expand_basis_reference`) multiplies in fp32 and
    converts.

    Args:
        Y: Expand sketches, shape (B, d, c) (any strides); the mixer's are bf16 numbers, stored in bf16.
        F_s: Their scaled factors ``D⁻¹F``, shape (B, c, c).
        dtype: The result's dtype.

    Returns:
        Q_e, shape (B, d, c), contiguous.
    """
    if Y.dim() != 3 or F_s.shape != (Y.shape[0], Y.shape[2], Y.shape[2]):
        raise ValueError(
            f"expand_basis: Y (B, d, c) and F_s (B, c, c) expected, got {tuple(Y.shape)}, {tuple(F_s.shape)}"
        )
    return _expand_basis_op(Y, F_s, dtype)
