"""The fused PACE mixer: α·Expand(x) − β·Compress(x) and π as one autograd function with a hand-written backward.

Shared work of the two operators (ridge projectors; both Compress forms):

* one sketch product ``S = x̂ᵀ[Ω_e | Ω_c]`` (B, d, c_e + r); the Compress sketches follow from it as
  ``Y_k = U_kᵀ S_c`` (no head-major copy of ``a = x̂U``);
* the small ridge factors ``F = chol(ŶᵀŶ + εI)⁻ᵀ``, kept as ``F_s = D⁻¹F`` so that ``Q = Ŷ F = Y F_s`` and ``Ŷ``
  is never written (:func:`pace.layers.basis.scaled_ridge_factors`), in float32 (float64 for float64 input);
* GEMM 1: ``a = x̂U`` and ``P = x̂Q_e``; GEMM 2: ``update = αx̂ − αPQ_eᵀ − βzUᵀ``, where z carries Compress:
* full form: per token and head ``c_k = a_kQ_k`` (the coordinates of ``col_k = c_kQ_kᵀ``, a_k through the ridge
  projector Q_kQ_kᵀ), ``‖col_k‖²``, π and ``z_k = π_k(a_k − col_k)``, all in registers of one kernel over a
  (:func:`pace.kernels.mixer_memberships`): −βzUᵀ is the paper's ``−β Σ_k π_k U_k(I − Q_kQ_kᵀ)U_kᵀx̂`` with no
  token-space basis ``U_kQ_k`` (B, d, K·r) and no product with one;
* diag form: ``keep_k = diag(Q_kQ_kᵀ)``, ``‖col_k‖² = Σ keep_k² a_k²``, ``z = π ⊙ (1 − keep) ⊙ a``.

The tokens are cast once to the matrix-product dtype (bf16 under autocast) and that copy serves every product of the
forward and the backward, and the αx term and ``<g, x>`` too: the projection's complement ``x − xΠ`` is then taken
of one vector (and x's float32 copy is neither read again nor kept for the backward). The backward reuses ``P``,
``a``, ``z`` and the factors, and goes through the ridge step with ``∂L/∂G = −½ F sym(Fᵀ F̄) Fᵀ``
(:func:`pace.layers.basis.ridge_factors_backward`). The full form's backward takes ∂L/∂‖col‖² per token (the
softmax over heads needs every head of a token), then sums ``Q̄_k = Σ_n a_kᵀW₁ + col̄_kᵀc_k`` per (image, head) over
the tokens in registers, writing ā on the way (:func:`pace.kernels.mixer_heads_backward`).

The work between the products runs in ``pace.kernels`` custom ops (Triton where it runs, their PyTorch fallbacks
elsewhere): the ridge Gram and factor, GEMM 1's right factor Q_e (:func:`pace.kernels.expand_basis`), the
memberships and their backward (:func:`pace.kernels.mixer_memberships`, :func:`pace.kernels.diag_memberships`),
the sums of products in fp32 (:func:`pace.kernels.matmul_sum`) and the backward's prologue
(:func:`pace.kernels.cast_dot`). On the CPU, where those ops run as their PyTorch fallbacks,
:func:`pace.layers.pace_attention` keeps the separate operators by default.
"""

import torch
from torch import Tensor

from pace import kernels
from pace.layers.basis import _matmul_dtype, _no_autocast, ridge_factors_backward, scaled_ridge_factors


def _expand_backward(xb, gb, gQe, P, scalars):
    """Q̄_e = x̂ᵀP̄_e + gᵀ(−αP) = −α(x̂ᵀgQ_e + gᵀx̂Q_e), (B, d, c_e), in the product dtype (P̄_e = −α gQ_e is not written:
    the products take −α as a coefficient, as x̄ does)."""
    return kernels.matmul_sum(
        None, [xb.mT, gb.mT], [gQe, P], scalars=scalars, codes=[0, -2, -2], dtype=scalars.dtype, out_dtype=xb.dtype
    )


def _memberships_backward(gQe, P, gU, a, pi, sq, g_pi, Q_c, keep, scalars):
    """The memberships' backward, from GEMM 1's cotangent products: ``(ā, Q̄_c, [α, β, τ partial sums])``, Q̄_c as
    Q_c (B·K, p, r); the full form without ``keep``."""
    BK, p, r = Q_c.shape
    if keep is not None:  # diag form: keep = diag(Q_kQ_kᵀ)
        a_bar, keep_bar, sums = kernels.diag_memberships_backward(gQe, P, gU, a, pi, sq, g_pi, keep, scalars)
        return a_bar, 2 * Q_c * keep_bar.view(BK, p, 1), sums
    # Full form: ∂L/∂‖col‖² through π (every head of a token at once), then per (image, head) over the tokens: ā and
    # Q̄_k summed in registers (pace.kernels).
    Qc4 = Q_c.view(a.shape[0], -1, p, r)
    sq_bar, sums = kernels.mixer_memberships_backward(gQe, P, gU, a, pi, sq, g_pi, Qc4, scalars)
    a_bar, Qc_bar = kernels.mixer_heads_backward(a, gU, pi, sq_bar, Qc4, scalars)
    return a_bar, Qc_bar.view(BK, p, r), sums


def _subspace_grad(xb, gb, a_bar, z, beta_w):
    """``Ū = x̂ᵀā − β gᵀz``, a new (d, d) matrix in β's dtype."""
    B, N, d = xb.shape
    x2, g2 = xb.reshape(B * N, d), gb.reshape(B * N, d)
    U_bar = (x2.mT @ a_bar.reshape(B * N, d)).to(beta_w.dtype)
    return U_bar.addcmul_((g2.mT @ z.reshape(B * N, d)).to(beta_w.dtype), beta_w, value=-1)


def _low_precision_tokens(
    x: Tensor, layer_norm: tuple[Tensor, Tensor, float] | None, dtype: torch.dtype
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """x (or its LayerNorm, ``layer_norm = (weight, bias, eps)``) written once in ``dtype``, and the norm's (μ, rstd)
    (an empty tuple without one)."""
    if layer_norm is None:
        return x.to(dtype), ()
    xb, mu, rstd = kernels.layer_norm_cast(x, *layer_norm, dtype)
    return xb, (mu, rstd)


class _PACEMixer(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, subspaces, tau, alpha, beta, expand_sketch, compress_sketch, residual, branch_scale, norm_weight,
        norm_bias, num_heads, eps, diag, norm_eps, residual_is_x, with_pi,
    ):  # fmt: skip
        B, N, d = x.shape
        K, ce, r = num_heads, expand_sketch.shape[1], compress_sketch.shape[1]
        if ce != K * r:
            raise ValueError(f"the Expand sketch needs num_heads * rank = {K * r} columns, got {ce}")
        p = d // K
        md = _matmul_dtype(x)
        wd = torch.promote_types(x.dtype, torch.float32)
        # With the block's LayerNorm (norm_eps given), x is the block's input and the norm is this function's first
        # pass: it writes the normalised tokens only in the product dtype. With `residual_is_x` the residual is x
        # itself (passed once: Dynamo does not trace one tensor given as two inputs), and the norm's backward adds
        # the residual's cotangent in its own pass.
        norm = norm_eps is not None
        residual = x if residual_is_x else residual  # residual_is_x only with a norm
        with _no_autocast(x.device.type):
            # the one low-precision copy of the (normalised) tokens, (B, N, d), and the norm's μ, rstd (B, N)
            xb, norm_stats = _low_precision_tokens(x, (norm_weight, norm_bias, norm_eps) if norm else None, md)
            omega = torch.cat([expand_sketch, compress_sketch], dim=1).to(md)  # (N, c_e + r)
            # (B, d, c_e + r), accumulated in the working precision and written in the product dtype, as a product
            # written there would be: its readers read bf16 numbers and convert them exactly (their products
            # accumulate in the working precision).
            S = kernels.matmul_sum(None, [xb.mT], [omega], dtype=wd, out_dtype=md)
            U = subspaces.to(wd)
            Ub = subspaces.to(md)
            # Y_k = U_kᵀ x̂ᵀ Ω_c for all heads: Uᵀ S_c per image (U broadcast, not copied), (B, K·p, r).
            S_c = S[..., ce:]
            Y_c = kernels.matmul_sum(None, [U.mT], [S_c], dtype=wd).view(B * K, p, r)
            n_e, G_e, F_e = scaled_ridge_factors(S[..., :ce], eps)  # Q_e = S_e F_e, (B, d, c_e)
            n_c, G_c, F_c = scaled_ridge_factors(Y_c, eps)
            Q_c = Y_c @ F_c  # (B·K, p, r)
            if diag:
                # ‖col_k‖² = Σ keep² a² from a product in the working precision (bf16 operands are exact there):
                # with a and its squares rounded to bf16 the τ gradient's error was 2e-2 of its scale σ on the
                # tests' inputs, 7e-3 this way. pace.kernels.diag_memberships writes a's product-dtype copy.
                # a_k = U_kᵀ x̂, heads side by side, from the product dtype's operands in the working precision (as
                # pace.layers.basis.wide_matmul, in one kernel that reads the bf16 operands as they are).
                a_w = kernels.matmul_sum(None, [xb.reshape(B * N, d)], [Ub], dtype=wd).view(B, N, d)
            else:
                a = (xb.reshape(B * N, d) @ Ub).view(B, N, d)  # a_k = U_kᵀ x̂, heads side by side
            tau_w, alpha_w, beta_w = tau.to(wd), alpha.to(wd), beta.to(wd)
            scalars = torch.stack([tau_w, alpha_w, beta_w])  # the coefficients GEMM 2 and x̄ read on the device
            Qc4 = Q_c.view(B, K, p, r)
            R = kernels.expand_basis(S[..., :ce], F_e, md)  # Q_e, (B, d, c_e)
            P = xb @ R  # x̂Q_e, (B, N, c_e); GEMM 2 scales it by −α (code −2)
            if diag:
                keep = Qc4.square().sum(-1)  # diag(Q_kQ_kᵀ), (B, K, p)
                # a in the product dtype, z = π ⊙ null, π and ‖col‖² = Σ_p keep² a²: one pass over a_w.
                a, z, pi, sq = kernels.diag_memberships(a_w, keep, scalars, md)
            else:
                # c_k = a_kQ_k, col_k = c_kQ_kᵀ, ‖col_k‖², π and z_k = π_k(a_k − col_k): one pass over a, the
                # products in registers. Compress's update, −β Σ_k π_k U_k(I − Q_kQ_kᵀ)U_kᵀx̂ per token, is then
                # −β zUᵀ (pace.kernels.mixer_memberships).
                z, pi, sq = kernels.mixer_memberships(a, Qc4, scalars)
                keep = None
            # GEMM 2 accumulates onto αx̂ in the working precision: its bf16 operands are exact there (and in TF32),
            # and the update is not rounded to bf16, whose error (2⁻⁹ of |αx̂Π_e|) would otherwise dominate the
            # small difference αx̂ − αx̂Π_e − … (on the tests' inputs 2.4e-2 of the update's largest entry, 1.5e-2
            # with this). x̂ is the bf16 copy the products read, so that difference is of one vector: with the
            # float32 x in the αx term the rounding of x̂ in x̂Π_e alone left 1.7e-2 (seeds 0–5), 1.3e-2 this way.
            # One kernel (pace.kernels.matmul_sum): the operands are read in their own dtypes, α, −α
            # and −β from `scalars`; the block's residual and stochastic-depth scales, if given, in its epilogue.
            # [residual +] [t_b ·] (αx̂ − α(x̂Q_e)Q_eᵀ − βzUᵀ), (B, N, d)
            out = kernels.matmul_sum(
                xb, [P, z.view(B, N, d)], [R.mT, U.mT], scalars=scalars, codes=[2, -2, -3], dtype=wd,
                D=residual, batch_scale=branch_scale,
            )  # fmt: skip
            out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
            # Never a no-op .to(): when the returned tensor is an alias of an intermediate, torch 2.11's Dynamo loses
            # its cotangent, and the compiled block's parameters got zero gradients (2.14 is not affected).
            out = out if out.dtype == out_dtype else out.to(out_dtype)
        ctx.save_for_backward(
            xb, omega, subspaces, Ub, S, n_e, G_e, F_e, Y_c, n_c, G_c, F_c, Q_c, a, R, P, pi, sq, scalars, keep, z,
            branch_scale, *((x, *norm_stats, norm_weight) if norm else ()),
        )  # fmt: skip
        ctx.dims, ctx.norm, ctx.fold_residual = (K, ce, r, eps), norm, residual_is_x
        # An unused π gets no zero cotangent written (see backward); without `with_pi` it is not an output at all,
        # so that a compiled graph does not write one either.
        ctx.set_materialize_grads(False)
        ctx.coefficient_dtypes = (tau.dtype, alpha.dtype, beta.dtype)
        ctx.x_dtype, ctx.has_residual = x.dtype, residual is not None
        return (out, pi) if with_pi else out

    @staticmethod
    def backward(ctx, g, g_pi=None):
        (xb, omega, subspaces, Ub, S, n_e, G_e, F_e, Y_c, n_c, G_c, F_c, Q_c, a, R, P, pi, sq, scalars, keep, z,
         branch_scale, *norm_saved) = ctx.saved_tensors  # fmt: skip
        K, ce, r, eps = ctx.dims
        tau_dtype, alpha_dtype, beta_dtype = ctx.coefficient_dtypes
        S_c = S[..., ce:]
        B, N, d = xb.shape
        p = d // K
        md, wd = xb.dtype, scalars.dtype
        # The residual's gradient is g itself; the update's is t_b·g (cast_dot scales g as it copies it).
        grad_residual = g if ctx.has_residual else None  # with fold_residual, added to x's below
        if g is None:  # only π was used
            g = torch.zeros_like(xb, dtype=ctx.x_dtype)
        with _no_autocast(g.device.type):
            tau_w, alpha_w, beta_w = scalars.unbind()
            U = subspaces.to(wd)
            if md == g.dtype:
                gb = g if branch_scale is None else g * branch_scale.to(g.dtype).view(B, 1, 1)
                g_x = torch.dot(gb.reshape(-1), xb.reshape(-1))
            else:  # the low-precision copy of g and <g, x̂> (a term of ∂L/∂α) from one read of g and x̂
                gb, g_x = kernels.cast_dot(g, xb, md, branch_scale)
            gR = gb @ R  # gQ_e, (B, N, c_e)
            gU = (gb.reshape(B * N, d) @ Ub).view(B, N, d)
            a_bar, Qc_bar, sums = _memberships_backward(gR, P, gU, a, pi, sq, g_pi, Q_c, keep, scalars)
            # α: <g, x − x̂Π_e> = <g, x> − <gQ_e, x̂Q_e>.
            grad_alpha, grad_beta, grad_tau = g_x.to(wd) + sums[0], sums[1], sums[2]
            Qe_bar = _expand_backward(xb, gb, gR, P, scalars)
            U_bar = _subspace_grad(xb, gb, a_bar, z, beta_w)
            # Ȳ_e only feeds x̄'s Ω_e Ȳ_eᵀ, whose Ω_e is bf16: written in the product dtype (x̄'s error over seeds
            # 0–5: 1.16e-2 in float32, 1.18e-2 this way).
            Ye_bar = ridge_factors_backward(S[..., :ce], n_e, G_e, F_e, eps, Qe_bar, out_dtype=md)  # (B, d, c_e)
            Yc_bar = ridge_factors_backward(Y_c, n_c, G_c, F_c, eps, Qc_bar.reshape(B * K, p, r))  # (B·K, p, r)
            Yc_bar = Yc_bar.view(B, K * p, r)  # (B, d, r)
            # Y_c = Uᵀ S_c: Ū += Σ_b S_c Ȳ_cᵀ, S̄_c = U Ȳ_c.
            U_bar.addbmm_(S_c.to(wd), Yc_bar.mT)
            Sc_bar = torch.bmm(U.expand(B, d, d), Yc_bar)  # (B, d, r)
            # x̄ = αg − α gQ_eQ_eᵀ + ā Uᵀ + Ω_e Ȳ_eᵀ + Ω_c S̄_cᵀ, accumulated in the working precision as the forward's
            # GEMM 2, in one kernel. As there, the αg term reads g's bf16 copy, which the other terms come from (x̄'s
            # error over seeds 0–5: 1.15e-2 with the float32 g, 1.16e-2 this way), so float32 g is read once.
            # Into the block's norm x̄ goes in the product dtype, as autocast's cast before a product would hand it.
            grad_x = kernels.matmul_sum(
                gb,
                [gR, a_bar.view(B, N, d), omega[:, :ce], omega[:, ce:]],
                [R.mT, U.mT, Ye_bar.mT, Sc_bar.mT],
                scalars=scalars,
                codes=[2, -2, 0, 0, 0],
                dtype=wd,
                out_dtype=md if ctx.norm else None,
            )
            grad_norm = (None, None)
            if ctx.norm:  # the norm's backward, with the residual's cotangent added in its pass when it is x's
                residual_grad, grad_residual = (grad_residual, None) if ctx.fold_residual else (None, grad_residual)
                grad_x, *grad_norm = kernels.layer_norm_backward(grad_x, *norm_saved, residual_grad)
            grad_x = grad_x.to(ctx.x_dtype)
        # x, U, τ, α, β, the sketches, residual, branch scales, the norm's weight and bias, then the non-tensors
        return (
            grad_x, U_bar.to(subspaces.dtype), grad_tau.to(tau_dtype), grad_alpha.to(alpha_dtype),
            grad_beta.to(beta_dtype), None, None, grad_residual, None, *grad_norm, *[None] * 7,
        )  # fmt: skip


def pace_mixer(
    *tensors: Tensor,
    num_heads: int,
    eps: float,
    form: str = "full",
    residual: Tensor | None = None,
    branch_scale: Tensor | None = None,
    layer_norm: tuple[Tensor, Tensor, float] | None = None,
    memberships: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``α·expand(x) − β·compress(x)`` and π with ridge projectors, fused (forward and backward).

    With ``residual`` the first output is ``residual + t_b·update`` (t_b from ``branch_scale``, else 1), added in
    GEMM 2's epilogue: the block's residual connection and stochastic depth without a pass of their own. With
    ``layer_norm`` the mixer's input is ``LayerNorm(x)``, normalised in its first pass (written only in the product
    dtype); when ``residual`` is x itself, the norm's backward adds the residual's cotangent in its own pass.

    Args:
        *tensors: ``x, subspaces, tau, alpha, beta, expand_sketch, compress_sketch``, in this order, as the
            arguments of :func:`pace.layers.pace_attention` (which calls this for ridge projectors).
        num_heads: K.
        eps: Ridge ε of both bases.
        form: Compress form, ``"full"`` or ``"diag"``.
        residual: Optional tokens the update is added to, x's shape.
        branch_scale: Optional per-image scales of the update, shape (B,) (stochastic depth: 0 or 1/keep); only
            with ``residual``.
        layer_norm: Optional ``(weight, bias, eps)`` of a LayerNorm over the last dimension applied to x first
            (a pre-norm block's norm; weight and bias of shape (C,)).
        memberships: Return π; with False π is None and no output of the autograd function (a compiled graph then
            writes no zero cotangent for it).

    Returns:
        ``(update, π)`` or ``(residual + t_b·update, π)``: the first in the dtype of x (promoted with the
        residual's), π in at least float32 (None with ``memberships=False``).
    """
    if len(tensors) != 7:
        raise TypeError(f"pace_mixer: x, subspaces, tau, alpha, beta and the two sketches expected, got {len(tensors)}")
    if branch_scale is not None and residual is None:
        raise ValueError("pace_mixer: branch_scale scales the update added to a residual; pass residual too")
    weight, bias, norm_eps = layer_norm if layer_norm is not None else (None, None, None)
    residual_is_x = layer_norm is not None and residual is tensors[0]
    out = _PACEMixer.apply(
        *tensors, None if residual_is_x else residual, branch_scale, weight, bias, num_heads, eps, form == "diag",
        norm_eps, residual_is_x, memberships,
    )  # fmt: skip
    return out if memberships else (out, None)
