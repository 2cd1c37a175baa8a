"""The fused PACE mixer's membership work (full Compress form) as torch custom ops: Triton where it runs.

``mixer_memberships``: from GEMM 1's ``P = x̂[Q_e | V]`` and ``a = x̂U``, the squared column norms
``‖col_k‖² = P_k M_k P_kᵀ`` (``M_k = Q_kᵀQ_k``), the memberships π, GEMM 2's left factor ``Ps = P ⊙ [−α | βπ_k]``
and ``z = π ⊙ a``. ``mixer_memberships_backward``: its backward, from GEMM 1's cotangent products. Each is one pass
over its (B, N, ·) tensors in the Triton kernel, where the PyTorch fallback (the op sequence the mixer ran before)
takes about ten. The ops have no autograd formula: ``pace.layers.mixer`` calls them inside its own
``autograd.Function``. ``cast_dot``: the backward's prologue, the cotangent's low-precision copy and its dot product
with the tokens (∂L/∂α) from one read of each. ``pack_bases``: GEMM 1's right factor ``R = [Q_e | V]`` in the
matrix-product dtype, written once from fp32 products (``Q_e = Y F_s``, ``V_k = U_k Q_k``). Backend per call as in
``pace.kernels._dispatch``.
"""

import torch
from torch import Tensor

from pace.kernels import _dispatch

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def block_diag(blocks: Tensor) -> Tensor:
    """Block-diagonal matrices (B, K·m, K·n) from per-head blocks (B, K, m, n): all heads in one product."""
    B, K, m, n = blocks.shape
    eye = torch.eye(K, device=blocks.device, dtype=blocks.dtype).view(1, K, K, 1, 1)
    return (blocks.unsqueeze(2) * eye).transpose(2, 3).reshape(B, K * m, K * n)  # (B, K, m, K, n) → (B, K·m, K·n)


def _head_scale(pi: Tensor, alpha: Tensor, beta: Tensor, dtype: torch.dtype) -> Tensor:
    # [−α (K groups of the Expand columns) | βπ_k (head k's Compress columns)], (B, N, 2K, 1).
    B, N, K = pi.shape
    return torch.cat([(-alpha).expand(B, N, K), beta * pi], dim=-1).unsqueeze(-1).to(dtype)


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


def mixer_memberships_reference(
    P: Tensor, a: Tensor, M: Tensor, scalars: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """PyTorch ``(Ps, z, π, ‖col‖²)``; products in P's dtype, the softmax in M's.

    Args:
        P: ``x̂[Q_e | V]``, shape (B, N, 2·K·r): the Expand columns, then head k's r Compress columns at K·r + k·r.
        a: ``x̂U``, shape (B, N, K·p).
        M: ``Q_kᵀQ_k``, shape (B, K, r, r), float32 or float64 (the work dtype).
        scalars: ``[τ, α, β]`` in M's dtype.

    Returns:
        ``Ps = P ⊙ [−α | βπ_k]`` and ``z = π ⊙ a`` in P's dtype, π and ``‖col‖²`` (B, N, K) in M's dtype.
    """
    B, N, _ = P.shape
    K, r = M.shape[1], M.shape[2]
    md, wd = P.dtype, M.dtype
    tau, alpha, beta = scalars.unbind()
    Pc = P[..., K * r :]
    T = Pc @ block_diag(M).to(md)  # P_k M_k for every head, (B, N, K·r)
    sq = (T * Pc).view(B, N, K, r).sum(-1, dtype=wd)  # (B, N, K)
    root = sq.clamp_min(_tiny(wd)).sqrt()  # the clamp keeps the square root's gradient finite
    pi = torch.softmax(root / tau, dim=-1)
    Ps = (P.view(B, N, 2 * K, r) * _head_scale(pi, alpha, beta, md)).view(B, N, 2 * K * r)
    z = a.view(B, N, K, -1) * pi.unsqueeze(-1).to(md)
    return Ps, z.view(a.shape), pi, sq


def mixer_memberships_backward_reference(
    g_R: Tensor, P: Tensor, g_U: Tensor, a: Tensor, pi: Tensor, sq: Tensor, g_pi: Tensor | None, M: Tensor,
    scalars: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """PyTorch backward of :func:`mixer_memberships_reference` (with ``Ps`` entering GEMM 2 and π an output).

    Args:
        g_R: ``g[Q_e | V]``, shape (B, N, 2·K·r) (g: the update's cotangent).
        P: As in the forward.
        g_U: ``gU``, shape (B, N, K·p).
        a: As in the forward.
        pi: π from the forward.
        sq: ``‖col‖²`` from the forward.
        g_pi: π's cotangent, (B, N, K), or None for zero.
        M: As in the forward.
        scalars: ``[τ, α, β]``.

    Returns:
        ``P̄`` (the cotangent of P through Ps and ‖col‖²), ``ā = −βπ ⊙ gU`` (through z), ``P_c ⊙ ∂‖col‖²``
        (B, N, K·r) (for ``M̄_k = Σ_n ∂‖col_k‖² P_kᵀP_k``), all in P's dtype, and the partial scalar gradients
        ``[−<gQ_e, x̂Q_e>, ∂L/∂β, ∂L/∂τ = −Σ ∂ℓ·‖col‖ / τ²]`` in M's dtype.
    """
    B, N, _ = P.shape
    K, r = M.shape[1], M.shape[2]
    Kr = K * r
    md, wd = P.dtype, M.dtype
    tau, alpha, beta = scalars.unbind()
    alpha_part = -(g_R[..., :Kr] * P[..., :Kr]).sum(dtype=wd)
    gV4, Pc4 = g_R[..., Kr:].view(B, N, K, r), P[..., Kr:].view(B, N, K, r)
    a4, gU4 = a.view(B, N, K, -1), g_U.view(B, N, K, -1)
    h = (gV4 * Pc4).sum(-1, dtype=wd) - (gU4 * a4).sum(-1, dtype=wd)  # <gV_k, P_k> − <gU_k, a_k>
    beta_part, tau_part, sq_bar = membership_backward(h, pi, sq, g_pi, tau, beta)
    a_bar = gU4 * (-beta * pi).unsqueeze(-1).to(md)
    # P̄ = [−α gQ_e | βπ_k gV_k + 2 ∂‖col_k‖² P_k M_k]
    P_bar = g_R.view(B, N, 2 * K, r) * _head_scale(pi, alpha, beta, md)
    T = P[..., Kr:] @ block_diag(M).to(md)
    P_bar[:, :, K:].addcmul_(T.view(B, N, K, r), (2 * sq_bar).unsqueeze(-1).to(md))
    Pc_w = (Pc4 * sq_bar.unsqueeze(-1).to(md)).view(B, N, Kr)
    partials = torch.stack([alpha_part, beta_part, tau_part])
    return P_bar.view(P.shape), a_bar.view(a.shape), Pc_w, partials


def _triton(P: Tensor, M: Tensor):
    supported = P.dtype in _TRITON_DTYPES and M.dtype == torch.float32
    return _dispatch.triton_module(P, "_triton_mixer") if supported else None


@torch.library.custom_op("pace::mixer_memberships", mutates_args=())
def _mixer_memberships_op(P: Tensor, a: Tensor, M: Tensor, scalars: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    module = _triton(P, M)
    if module is None:
        return tuple(t.contiguous() for t in mixer_memberships_reference(P, a, M, scalars))
    return module.mixer_memberships(P.contiguous(), a.contiguous(), M.contiguous(), scalars.contiguous())


@_mixer_memberships_op.register_fake
def _(P: Tensor, a: Tensor, M: Tensor, scalars: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, N, _ = P.shape
    K = M.shape[1]
    return P.new_empty(P.shape), a.new_empty(a.shape), M.new_empty((B, N, K)), M.new_empty((B, N, K))


@torch.library.custom_op("pace::mixer_memberships_backward", mutates_args=())
def _mixer_memberships_backward_op(
    g_R: Tensor, P: Tensor, g_U: Tensor, a: Tensor, pi: Tensor, sq: Tensor, g_pi: Tensor | None, M: Tensor,
    scalars: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    module = _triton(P, M)
    args = (g_R, P, g_U, a, pi, sq, g_pi, M, scalars)
    if module is None:
        return tuple(t.contiguous() for t in mixer_memberships_backward_reference(*args))
    return module.mixer_memberships_backward(*(None if t is None else t.contiguous() for t in args))


@_mixer_memberships_backward_op.register_fake
def _(g_R, P, g_U, a, pi, sq, g_pi, M, scalars) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, N, _ = P.shape
    K, r = M.shape[1], M.shape[2]
    return P.new_empty(P.shape), a.new_empty(a.shape), P.new_empty((B, N, K * r)), M.new_empty((3,))


def _check(P: Tensor, a: Tensor, M: Tensor, scalars: Tensor) -> None:
    ok = P.dim() == 3 and a.dim() == 3 and M.dim() == 4 and M.shape[2] == M.shape[3] and scalars.shape == (3,)
    if ok:
        B, N, _ = P.shape
        K, r = M.shape[1], M.shape[2]
        ok = P.shape[2] == 2 * K * r and a.shape[:2] == (B, N) and a.shape[2] % K == 0 and M.shape[0] == B
    if not ok:
        raise ValueError(
            "mixer_memberships: P (B, N, 2·K·r), a (B, N, K·p), M (B, K, r, r) and scalars (3,) expected, got "
            f"{tuple(P.shape)}, {tuple(a.shape)}, {tuple(M.shape)}, {tuple(scalars.shape)}"
        )


def mixer_memberships(P: Tensor, a: Tensor, M: Tensor, scalars: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Memberships and GEMM 2's factors of the fused mixer (custom op ``pace::mixer_memberships``).

    ``‖col_k‖² = P_k M_k P_kᵀ``, ``π = softmax_k(max(‖col_k‖², tiny)^½ / τ)``, ``Ps = P ⊙ [−α | βπ_k]`` and
    ``z = π ⊙ a``. The Triton kernel (CUDA, or the interpreter when forced; float32 M) reads P, a and M once and
    computes in fp32 with one rounding per output; the fallback is :func:`mixer_memberships_reference`.

    Args:
        P: ``x̂[Q_e | V]``, shape (B, N, 2·K·r).
        a: ``x̂U``, shape (B, N, K·p).
        M: ``Q_kᵀQ_k``, shape (B, K, r, r).
        scalars: ``[τ, α, β]`` in M's dtype.

    Returns:
        ``(Ps, z, π, ‖col‖²)``: Ps and z in P's dtype, π and ‖col‖² (B, N, K) in M's dtype.
    """
    _check(P, a, M, scalars)
    return _mixer_memberships_op(P, a, M, scalars)


def mixer_memberships_backward(
    g_R: Tensor, P: Tensor, g_U: Tensor, a: Tensor, pi: Tensor, sq: Tensor, g_pi: Tensor | None, M: Tensor,
    scalars: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Backward of :func:`mixer_memberships` (custom op ``pace::mixer_memberships_backward``).

    Arguments and results as :func:`mixer_memberships_backward_reference`; the Triton kernel reads each input once
    and writes each output once (fp32 arithmetic, one rounding per output; the scalar partial sums per program,
    added up in fp32). ``g_pi`` may be None (π unused by the loss: a zero cotangent that is never written).
    """
    _check(P, a, M, scalars)
    per_head = P.shape[:2] + M.shape[1:2]  # (B, N, K)
    g_pi_shape = per_head if g_pi is None else g_pi.shape
    if g_R.shape != P.shape or g_U.shape != a.shape or not pi.shape == sq.shape == g_pi_shape == per_head:
        raise ValueError("mixer_memberships_backward: cotangent or saved shapes do not match the forward's")
    return _mixer_memberships_backward_op(g_R, P, g_U, a, pi, sq, g_pi, M, scalars)


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


def pack_bases_reference(Y: Tensor, F_s: Tensor, U: Tensor, Q_c: Tensor | None, dtype: torch.dtype) -> Tensor:
    """PyTorch ``R = [Y F_s | U_k Q_k]``: products in F_s's dtype, then one conversion into R.

    Args:
        Y: Expand sketches, shape (B, d, c) (any strides), in F_s's dtype or narrower (converted).
        F_s: Their scaled factors ``D⁻¹F``, shape (B, c, c).
        U: Subspaces, shape (d, K·p), in F_s's dtype.
        Q_c: Compress bases, shape (B·K, p, r), or None for ``R = Y F_s`` alone (diag form).
        dtype: R's dtype.

    Returns:
        R, shape (B, d, c + K·r), in ``dtype``.
    """
    B, d, c = Y.shape
    Q_e = Y.to(F_s.dtype) @ F_s  # (B, d, c)
    if Q_c is None:
        return Q_e.to(dtype)
    K, p, r = Q_c.shape[0] // B, Q_c.shape[1], Q_c.shape[2]
    # V_k = U_k Q_k for all heads at once: (K, d, p) @ (K, p, B·r).
    U_heads = U.view(d, K, p).transpose(0, 1)
    V_heads = U_heads @ Q_c.view(B, K, p, r).permute(1, 2, 0, 3).reshape(K, p, B * r)  # (K, d, B·r)
    R = torch.empty(B, d, c + K * r, device=Y.device, dtype=dtype)
    R[..., :c].copy_(Q_e)
    R[..., c:].view(B, d, K, r).copy_(V_heads.view(K, d, B, r).permute(2, 1, 0, 3))
    return R


@torch.library.custom_op("pace::pack_bases", mutates_args=())
def _pack_bases_op(Y: Tensor, F_s: Tensor, U: Tensor, Q_c: Tensor | None, dtype: torch.dtype) -> Tensor:
    tensors = (F_s, U) if Q_c is None else (F_s, U, Q_c)
    supported = all(t.dtype == torch.float32 for t in tensors) and Y.dtype in _TRITON_DTYPES and dtype in _TRITON_DTYPES
    module = _dispatch.triton_module(Y, "_triton_mixer") if supported else None
    if module is None:
        return pack_bases_reference(Y, F_s, U, Q_c, dtype)
    return module.pack_bases(Y, F_s.contiguous(), U, None if Q_c is None else Q_c.contiguous(), dtype)


@_pack_bases_op.register_fake
def _(Y: Tensor, F_s: Tensor, U: Tensor, Q_c: Tensor | None, dtype: torch.dtype) -> Tensor:
    B, d, c = Y.shape
    extra = 0 if Q_c is None else (Q_c.shape[0] // B) * Q_c.shape[2]
    return Y.new_empty((B, d, c + extra), dtype=dtype)


def pack_bases(Y: Tensor, F_s: Tensor, U: Tensor, Q_c: Tensor | None, dtype: torch.dtype) -> Tensor:
    """GEMM 1's right factor ``R = [Y F_s | U_k Q_k]`` in ``dtype`` (custom op ``pace::pack_bases``; no autograd).

    ``Q_e = Y F_s`` is the Expand basis and ``V_k = U_k Q_k`` head k's Compress basis in token space; both must be
    formed to fp32 accuracy and only then rounded (GPU_PERF.md §2b). The Triton kernel (float32 F_s, U and Q_c; Y
    in float32 or, read as it is and converted in registers, bfloat16/float16) computes each tile of R with
    fp32-accurate products and writes it once, rounded; the fallback (:func:`pack_bases_reference`) forms Q_e and
    V in fp32 and copies them into R.

    Args:
        Y: Expand sketches, shape (B, d, c) (any strides); the mixer's are bf16 numbers, stored in bf16.
        F_s: Their scaled factors ``D⁻¹F``, shape (B, c, c).
        U: Subspaces, shape (d, K·p).
        Q_c: Compress bases, shape (B·K, p, r), or None (diag form: R = Y F_s).
        dtype: R's dtype.

    Returns:
        R, shape (B, d, c + K·r) (K·r = 0 without Q_c), contiguous.
    """
    B, d, c = Y.shape if Y.dim() == 3 else (0, 0, 0)
    ok = Y.dim() == 3 and F_s.shape == (B, c, c) and U.dim() == 2 and U.shape[0] == d
    if ok and Q_c is not None:
        ok = Q_c.dim() == 3 and B > 0 and Q_c.shape[0] % B == 0 and Q_c.shape[0] // B * Q_c.shape[1] == U.shape[1]
    if not ok:
        shapes = [None if t is None else tuple(t.shape) for t in (Y, F_s, U, Q_c)]
        raise ValueError(f"pack_bases: Y (B, d, c), F_s (B, c, c), U (d, K·p), Q_c (B·K, p, r) expected, got {shapes}")
    return _pack_bases_op(Y, F_s, U, Q_c, dtype)
