"""The fused PACE mixer: α·Expand(x) − β·Compress(x) and π as one autograd function with a hand-written backward.

Shared work of the two operators (ridge projectors; both Compress forms):

* one sketch product ``S = x̂ᵀ[Ω_e | Ω_c]`` (B, d, c_e + r); the Compress sketches follow from it as
  ``Y_k = U_kᵀ S_c`` (no head-major copy of ``a = x̂U``);
* the small ridge factors ``F = chol(ŶᵀŶ + εI)⁻ᵀ`` (:func:`pace.layers.basis.inverse_cholesky_factor`) and
  ``Q = Ŷ F`` in float32 (float64 for float64 input);
* full form: ``V_k = U_k Q_k`` (d × r per head), then GEMM 1: ``a = x̂U`` and ``P = x̂[Q_e | V]``, where
  ``P_{c,k} = Q_kᵀ a_k`` are the coordinates of ``col_k`` and ``‖col_k‖² = P_{c,k} (Q_kᵀQ_k) P_{c,k}ᵀ`` is an r × r
  quadratic form; GEMM 2: ``update = αx + (P ⊙ s)[Q_e | V]ᵀ − β(π ⊙ a)Uᵀ`` with ``s = −α`` on the Expand columns
  and ``βπ_k`` on head k's columns. No (B, N, d) ``col`` or ``null`` tensor and no head-major copy;
* diag form: ``keep_k = diag(Q_kQ_kᵀ)``, ``‖col_k‖² = Σ keep_k² a_k²``,
  ``update = αx − αP_eQ_eᵀ − β(π ⊙ (1 − keep) ⊙ a)Uᵀ``.

The price of no head-major copy: ``x̂V`` has K·r columns where the per-head products ``a_kQ_k`` have r each, about
14 % more matrix FLOPs per block at ViT-S sizes; hence :func:`pace.layers.pace_attention` keeps the separate
operators on the (FLOP-bound) CPU by default.

The tokens are cast once to the matrix-product dtype (bf16 under autocast) and that copy serves every product of
the forward and the backward. The backward reuses ``P``, ``a`` and the factors, and goes through the ridge step
with ``∂L/∂G = −½ F sym(Fᵀ F̄) Fᵀ`` (:func:`pace.layers.basis.ridge_factors_backward`).
"""

import torch
from torch import Tensor

from pace.layers.basis import _matmul_dtype, _no_autocast, _ridge_factors, ridge_factors_backward


def _sqrt_logits(sq: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
    # ‖col‖ / τ from ‖col‖²; the clamp at the smallest normal keeps the square root's gradient finite (see compress).
    root = sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()
    return root, root / tau


def _block_diag(blocks: Tensor) -> Tensor:
    """Block-diagonal matrices (B, K·m, K·n) from per-head blocks (B, K, m, n): all heads in one product."""
    B, K, m, n = blocks.shape
    eye = torch.eye(K, device=blocks.device, dtype=blocks.dtype).view(1, K, K, 1, 1)
    return (blocks.unsqueeze(2) * eye).transpose(2, 3).reshape(B, K * m, K * n)  # (B, K, m, K, n) → (B, K·m, K·n)


def _diag_blocks(full: Tensor, num_heads: int) -> Tensor:
    """The K diagonal blocks (B, K, m, n) of matrices (B, K·m, K·n)."""
    B, Km, Kn = full.shape
    K = num_heads
    return full.view(B, K, Km // K, K, Kn // K).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)


def _per_head_sum(weights: Tensor, rows: Tensor, num_heads: int) -> Tensor:
    """``Σ_n weights[b, n, k] · rows[b, n, k, :]`` for every image and head: (B, N, K), (B, N, K·p) → (B, K, p)."""
    return _diag_blocks(weights.mT @ rows, num_heads).squeeze(2)  # (B, K, K·p) → (B, K, 1, p)


def _heads_major(t: Tensor, num_heads: int) -> Tensor:
    """(B, m, K·n) → (K, m, B·n): one matrix per head with the images side by side (for head-wise products)."""
    B, m, Kn = t.shape
    return t.view(B, m, num_heads, Kn // num_heads).permute(2, 1, 0, 3).reshape(num_heads, m, -1)


def _images_major(t: Tensor, batch: int) -> Tensor:
    """Inverse of :func:`_heads_major`: (K, m, B·n) → (B, m, K·n), as a view where possible."""
    K, m, Bn = t.shape
    return t.view(K, m, batch, Bn // batch).permute(2, 1, 0, 3).reshape(batch, m, -1)


class _PACEMixer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, subspaces, tau, alpha, beta, expand_sketch, compress_sketch, num_heads, eps, diag):
        B, N, d = x.shape
        K, ce, r = num_heads, expand_sketch.shape[1], compress_sketch.shape[1]
        if ce != K * r:
            raise ValueError(f"the Expand sketch needs num_heads * rank = {K * r} columns, got {ce}")
        p = d // K
        md = _matmul_dtype(x)
        wd = torch.promote_types(x.dtype, torch.float32)
        with _no_autocast(x.device.type):
            xb = x.to(md)  # the one low-precision copy of the tokens, (B, N, d)
            omega = torch.cat([expand_sketch, compress_sketch], dim=1).to(md)  # (N, c_e + r)
            S = (xb.mT @ omega).to(wd)  # (B, d, c_e + r)
            U = subspaces.to(wd)
            Ub = subspaces.to(md)
            U_heads = U.view(d, K, p).transpose(0, 1)  # (K, d, p)
            # Y_k = U_kᵀ x̂ᵀ Ω_c for all heads: (K, p, d) @ (d, B·r), back to (B·K, p, r).
            S_c = S[..., ce:]
            Y_c = U.mT @ S_c.transpose(0, 1).reshape(d, B * r)  # (d, B·r) = (K·p, B·r)
            Y_c = Y_c.view(K, p, B, r).permute(2, 0, 1, 3).reshape(B * K, p, r)
            Yh_e, n_e, F_e, Q_e = _ridge_factors(S[..., :ce], eps)  # (B, d, c_e)
            Yh_c, n_c, F_c, Q_c = _ridge_factors(Y_c, eps)  # (B·K, p, r)
            if diag:
                # ‖col_k‖² = Σ keep² a² from a product in the working precision (bf16 operands are exact there):
                # with a and its squares rounded to bf16 the τ gradient's error was 2e-2 of its scale σ on the
                # tests' inputs, 7e-3 this way.
                a_w = (xb.reshape(B * N, d).to(wd) @ U).view(B, N, d)  # a_k = U_kᵀ x̂, heads side by side
                a = a_w.to(md)
            else:
                a = (xb.reshape(B * N, d) @ Ub).view(B, N, d)  # a_k = U_kᵀ x̂, heads side by side
            tau_w, alpha_w, beta_w = tau.to(wd), alpha.to(wd), beta.to(wd)
            Qc4 = Q_c.view(B, K, p, r)
            if diag:
                R = Q_e.to(md)  # (B, d, c_e)
                P = xb @ R  # P_e, (B, N, c_e)
                keep = Qc4.square().sum(-1)  # diag(Q_kQ_kᵀ), (B, K, p)
                sq = a_w.square() @ _block_diag(keep.square().unsqueeze(-1))  # Σ_p keep² a², (B, N, K)
                root, logits = _sqrt_logits(sq, tau_w)
                pi = torch.softmax(logits, dim=-1)  # (B, N, K)
                z = a.view(B, N, K, p) * (pi.unsqueeze(-1) * (1 - keep).unsqueeze(1)).to(md)  # π ⊙ null
                Ps = P * (-alpha_w).to(md)
                extra, T = keep, None
            else:
                # V_k = U_k Q_k for all heads at once: (K, d, p) @ (K, p, B·r).
                V_heads = U_heads @ Qc4.permute(1, 2, 0, 3).reshape(K, p, B * r)  # (K, d, B·r)
                R = torch.empty(B, d, ce + K * r, device=x.device, dtype=md)
                R[..., :ce].copy_(Q_e)
                R[..., ce:].view(B, d, K, r).copy_(V_heads.view(K, d, B, r).permute(2, 1, 0, 3))  # [Q_e | V]
                P = xb @ R  # [x̂Q_e | x̂V], (B, N, c_e + K·r); x̂V_k = Q_kᵀ a_k
                Pc = P[..., ce:]
                # ‖col_k‖² = P_k (Q_kᵀQ_k) P_kᵀ: all heads through one block-diagonal (K·r × K·r) matrix per image.
                T = Pc @ _block_diag(Qc4.mT @ Qc4).to(md)  # (B, N, K·r)
                sq = (T * Pc).view(B, N, K, r).sum(-1, dtype=wd)  # (B, N, K)
                root, logits = _sqrt_logits(sq, tau_w)
                pi = torch.softmax(logits, dim=-1)
                # GEMM 2's left factor: P ⊙ [−α | βπ_k], so that update = αx + (P ⊙ s')[Q_e | V]ᵀ − β(π ⊙ a)Uᵀ.
                # c_e = K·r: the Expand columns are K more groups of r, each scaled by −α.
                head_scale = torch.cat([(-alpha_w).expand(B, N, K), beta_w * pi], dim=-1).unsqueeze(-1).to(md)
                Ps = (P.view(B, N, 2 * K, r) * head_scale).view(B, N, 2 * K * r)
                z = a.view(B, N, K, p) * pi.unsqueeze(-1).to(md)  # π ⊙ a
                extra = None
            # GEMM 2 accumulates onto αx in the working precision: its bf16 operands are exact there (and in TF32),
            # and the update is not rounded to bf16, whose error (2⁻⁹ of |αx̂Π_e|) would otherwise dominate the
            # small difference αx − αx̂Π_e − … (on the tests' inputs 2.4e-2 of the update's largest entry, 1.5e-2
            # with this; the rounding of x̂ itself leaves 1.2e-2).
            out = torch.baddbmm(x.to(wd) * alpha_w, Ps.to(wd), R.to(wd).mT)  # αx + (P ⊙ s')[Q_e | V]ᵀ, (B, N, d)
            out.view(B * N, d).addmm_(z.reshape(B * N, d).to(wd), (U * -beta_w).mT)  # −β(π ⊙ …)Uᵀ
            out = out.to(x.dtype)
        ctx.save_for_backward(
            x, xb, omega, subspaces, S_c, Yh_e, n_e, F_e, Yh_c, n_c, F_c, Q_c, a, R, P, Ps, pi, sq, root, tau, alpha,
            beta, extra, T,
        )  # fmt: skip
        ctx.dims = (K, ce, r, diag)
        return out, pi

    @staticmethod
    def backward(ctx, g, g_pi):
        (x, xb, omega, subspaces, S_c, Yh_e, n_e, F_e, Yh_c, n_c, F_c, Q_c, a, R, P, Ps, pi, sq, root, tau, alpha,
         beta, keep, T) = ctx.saved_tensors  # fmt: skip
        K, ce, r, diag = ctx.dims
        B, N, d = xb.shape
        p = d // K
        md, wd = xb.dtype, S_c.dtype
        with _no_autocast(g.device.type):
            tau_w, alpha_w, beta_w = tau.to(wd), alpha.to(wd), beta.to(wd)
            U, Ub = subspaces.to(wd), subspaces.to(md)
            gb = g.to(md)
            gR = gb @ R  # [gQ_e | gV], (B, N, c_e [+ K·r])
            gU = (gb.reshape(B * N, d) @ Ub).view(B, N, d)
            gQe, Pe = gR[..., :ce], P[..., :ce]
            # α: <g, x − x̂Π_e> = <g, x> − <gQ_e, x̂Q_e>
            grad_alpha = torch.dot(g.reshape(-1), x.reshape(-1)).to(wd) - (gQe * Pe).sum(dtype=wd)
            a4, gU4 = a.view(B, N, K, p), gU.view(B, N, K, p)
            if diag:
                a_w = a.to(wd)
                u = gU.to(wd) * a_w
                h = -(u @ _block_diag((1 - keep).unsqueeze(-1)))  # −Σ_p gU a (1 − keep), (B, N, K)
            else:
                gV4, Pc4 = gR[..., ce:].view(B, N, K, r), P[..., ce:].view(B, N, K, r)
                h = (gV4 * Pc4).sum(-1, dtype=wd) - (gU4 * a4).sum(-1, dtype=wd)  # <gV_k, P_k> − <gU_k, a_k>
            grad_beta = (pi * h).sum()
            pi_bar = g_pi.to(wd) + beta_w * h
            # Softmax, then ℓ = max(‖col‖², tiny)^½ / τ.
            l_bar = pi * (pi_bar - (pi_bar * pi).sum(-1, keepdim=True))
            grad_tau = -(l_bar * root).sum() / tau_w.square()
            sq_bar = l_bar * (sq >= torch.finfo(sq.dtype).tiny) / (2 * tau_w * root)  # (B, N, K)
            neg_beta_pi = (-beta_w * pi).unsqueeze(-1)  # (B, N, K, 1)
            if diag:
                z = a4 * (pi.unsqueeze(-1) * (1 - keep).unsqueeze(1)).to(md)  # π ⊙ null, (B, N, K, p)
                a_bar = gU4 * (neg_beta_pi * (1 - keep).unsqueeze(1)).to(md)
                a_bar.addcmul_(a4, (2 * sq_bar.unsqueeze(-1) * keep.square().unsqueeze(1)).to(md))
                # keep enters null (through z) and ‖col‖² = Σ keep² a².
                keep_bar = beta_w * _per_head_sum(pi, u, K)
                keep_bar = keep_bar + 2 * keep * _per_head_sum(sq_bar, a_w.square(), K)
                Qc_bar = 2 * Q_c * keep_bar.view(B * K, p, 1)
                Pbar = gQe * (-alpha_w).to(md)  # ∂L/∂(x̂Q_e), (B, N, c_e)
                Qe_bar = torch.baddbmm(xb.mT @ Pbar, gb.mT, Ps).to(wd)  # xᵀP̄_e + gᵀ(−αP_e)
                U_bar = torch.zeros_like(U)
            else:
                z = a4 * pi.unsqueeze(-1).to(md)  # π ⊙ a
                a_bar = gU4 * neg_beta_pi.to(md)
                # P̄ = [−α gQ_e | βπ_k gV_k + 2 ∂‖col_k‖² T_k]
                head_scale = torch.cat([(-alpha_w).expand(B, N, K), beta_w * pi], dim=-1).unsqueeze(-1).to(md)
                Pbar = gR.view(B, N, 2 * K, r) * head_scale
                Pbar[:, :, K:].addcmul_(T.view(B, N, K, r), (2 * sq_bar).unsqueeze(-1).to(md))
                Pbar = Pbar.view(B, N, 2 * K * r)
                R_bar = torch.baddbmm(xb.mT @ Pbar, gb.mT, Ps).to(wd)  # xᵀP̄ + gᵀ(P ⊙ s'), (B, d, c_e + K·r)
                Qe_bar = R_bar[..., :ce]
                V_bar = _heads_major(R_bar[..., ce:], K)  # (K, d, B·r)
                # ‖col‖² = P_k M_k P_kᵀ with M_k = Q_kᵀQ_k: M̄_k = Σ_n ∂‖col_k‖² P_kᵀ P_k.
                Pc = P[..., ce:]
                Pc_w = (Pc.view(B, N, K, r) * sq_bar.unsqueeze(-1).to(md)).view(B, N, K * r)
                M_bar = _diag_blocks(Pc_w.mT @ Pc, K).to(wd)  # (B, K, r, r)
                Qc4 = Q_c.view(B, K, p, r)
                U_heads = U.view(d, K, p).transpose(0, 1)  # (K, d, p)
                # Through V_k = U_kQ_k: Q̄_k = U_kᵀ V̄_k, Ū_k = Σ_b V̄_k Q_kᵀ (images side by side).
                Qc_heads = Qc4.permute(1, 2, 0, 3).reshape(K, p, B * r)  # (K, p, B·r)
                Qc_bar = (U_heads.mT @ V_bar).view(K, p, B, r).permute(2, 0, 1, 3)  # (B, K, p, r)
                Qc_bar = Qc_bar + 2 * Qc4 @ M_bar
                U_bar = (V_bar @ Qc_heads.mT).transpose(0, 1).reshape(d, d)  # (K, d, p) → (d, K·p)
            x2, g2 = xb.reshape(B * N, d), gb.reshape(B * N, d)
            a_bar2 = a_bar.reshape(B * N, d)
            U_bar = U_bar + (x2.mT @ a_bar2).to(wd) - beta_w * (g2.mT @ z.reshape(B * N, d)).to(wd)
            Ye_bar = ridge_factors_backward(Yh_e, n_e, F_e, Qe_bar)  # (B, d, c_e)
            Yc_bar = ridge_factors_backward(Yh_c, n_c, F_c, Qc_bar.reshape(B * K, p, r))  # (B·K, p, r)
            Yc_bar = Yc_bar.view(B, K * p, r)  # (B, d, r)
            # Y_c = Uᵀ S_c: Ū += Σ_b S_c Ȳ_cᵀ, S̄_c = U Ȳ_c.
            U_bar = U_bar + S_c.transpose(0, 1).reshape(d, B * r) @ Yc_bar.transpose(0, 1).reshape(d, B * r).mT
            S_bar = torch.empty(B, d, ce + r, device=g.device, dtype=wd)
            S_bar[..., :ce].copy_(Ye_bar)
            S_bar[..., ce:].copy_(U @ Yc_bar)
            # x̄ = αg + P̄ Rᵀ + ā Uᵀ + Ω S̄ᵀ, accumulated in the working precision as the forward's GEMM 2.
            grad_x = torch.baddbmm(g.to(wd) * alpha_w, Pbar.to(wd), R.to(wd).mT)
            grad_x.view(B * N, d).addmm_(a_bar2.to(wd), U.mT)
            grad_x.baddbmm_(omega.to(wd).expand(B, N, -1), S_bar.mT)
            grad_x = grad_x.to(x.dtype)
        return (
            grad_x,
            U_bar.to(subspaces.dtype),
            grad_tau.to(tau.dtype),
            grad_alpha.to(alpha.dtype),
            grad_beta.to(beta.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def pace_mixer(
    x: Tensor,
    subspaces: Tensor,
    tau: Tensor,
    alpha: Tensor,
    beta: Tensor,
    expand_sketch: Tensor,
    compress_sketch: Tensor,
    *,
    num_heads: int,
    eps: float,
    form: str = "full",
) -> tuple[Tensor, Tensor]:
    """``α·expand(x) − β·compress(x)`` and π with ridge projectors, fused (forward and backward).

    Args:
        x: Normalised tokens, shape (B, N, d).
        subspaces: ``U``, shape (d, d).
        tau: Temperature τ, a 0-dim tensor.
        alpha: Effective α, a 0-dim tensor.
        beta: Effective β, a 0-dim tensor.
        expand_sketch: Ω_e, shape (N, r·K).
        compress_sketch: Ω_c, shape (N, r).
        num_heads: K.
        eps: Ridge ε of both bases.
        form: Compress form, ``"full"`` or ``"diag"``.

    Returns:
        ``(update, memberships)``: update (B, N, d) in the dtype of ``x``; π (B, N, K) in at least float32.
    """
    return _PACEMixer.apply(
        x, subspaces, tau, alpha, beta, expand_sketch, compress_sketch, num_heads, eps, form == "diag"
    )
