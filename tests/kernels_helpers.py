"""Run pace.kernels' Triton kernels on CPU tensors through the Triton interpreter, in a subprocess.

Triton picks interpretation for its standard library when ``triton`` is first imported, which torch does early in
a test session; so the interpreter runs in a fresh Python started with ``TRITON_INTERPRET=1``. Inputs and outputs
travel through one ``torch.save`` file each way.
"""

import os
import pathlib
import subprocess
import sys

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]

# Each case: ("factor", G[, row_scale]) -> F (D⁻¹F), ("gram", Y, eps) -> (scale, G),
# ("memberships", a, col, tau) -> (w, π),
# ("mixer_fwd", a, Q_c, scalars) -> (z, π, ‖col‖²), ("mixer_bwd", gQ_e, P, g_U, a, π, ‖col‖², g_π, Q_c, scalars)
# -> (∂‖col‖², sums), ("mixer_heads", a, g_U, π, ∂‖col‖², Q_c, scalars) -> (ā, Q̄_c),
# ("diag_fwd", a_w, keep, scalars, dtype) -> (a, z, π, ‖col‖²), ("diag_bwd", gQ_e,
# P_e, gU, a, π, ‖col‖², g_π, keep, scalars) -> (ā, ∂keep, sums), ("cast_dot", g, x, dtype[, scale]) -> (copy, <g, x>),
# ("pack", Y, F_s, dtype) -> Q_e (expand_basis),
# ("matmul_sum", C, lhs, rhs, scalars, codes[, keywords]) -> the sum,
# ("norm_fwd", x, w, b, eps, dtype) -> (y, μ, rstd), ("norm_bwd", dy, x, μ, rstd, w, residual_grad) -> (dx, dw, db),
# ("ridge_grad", W, F_s, G, scale, eps) -> Γ, ("radial", W, F_s, G, G_s, scale, eps[, coef][, {"half": True}]) -> Γ
# or ("pace_mixer", x, U, τ, α, β,
# Ω_e, Ω_c, g, g_π, K) -> (update, π, gradients of x, U, τ, α, β) with how = the Compress form; "poison" fills the
# output buffers with NaN first, "tile16" too with 16 × 16 tiles, "op" goes through the public custom op under
# use_backend("interpret").
_RUNNER = r"""
import sys
import torch
torch.set_num_threads(1)
from pace.kernels import _dispatch, use_backend, inverse_cholesky_factor, normalized_gram, compress_memberships
from pace.kernels import cast_dot, mixer_memberships, mixer_memberships_backward, expand_basis, matmul_sum
from pace.kernels import mixer_heads_backward
from pace.kernels import ridge_gradient_matrix, ridge_radial_diagonal, diag_memberships, diag_memberships_backward
cases = torch.load(sys.argv[1])
with use_backend("interpret"):
    module = _dispatch.triton_module(torch.empty(0))
    assert module is not None and _dispatch._interpreted(module), "the interpreter did not engage"
    mixer = _dispatch.triton_module(torch.empty(0), "_triton_mixer")
    assert mixer is not None and _dispatch._interpreted(mixer), "the interpreter did not engage"
    nan = float("nan")
    results = {}
    for name, (kind, args, how) in cases.items():
        if kind == "factor":
            G, *row_scale = args  # row_scale: optional, (B, c)
            row_scale = row_scale[0] if row_scale else None
            if how == "op":
                results[name] = inverse_cholesky_factor(G, row_scale)
            else:
                out = torch.full(G.shape, float("nan"))
                tile = int(how[4:]) if how.startswith("tile") else None
                results[name] = module.inverse_cholesky_factor(G, out=out, tile=tile, row_scale=row_scale)
        elif kind == "mixer_fwd":
            a, Q_c, scalars = args
            if how == "op":
                results[name] = mixer_memberships(*args)
            else:
                per_head = torch.full(a.shape[:2] + Q_c.shape[1:2], nan)
                out = (torch.full_like(a, nan), per_head, per_head.clone())
                results[name] = mixer.mixer_memberships(*args, out=out)
        elif kind == "mixer_bwd":
            if how == "op":
                results[name] = mixer_memberships_backward(*args)
            else:
                results[name] = mixer.mixer_memberships_backward(*args, out=torch.full_like(args[4], nan))
        elif kind == "mixer_heads":
            a, Q_c = args[0], args[4]
            if how == "op":
                results[name] = mixer_heads_backward(*args)
            else:
                out = (torch.full_like(a, nan), torch.full_like(Q_c, nan))
                results[name] = mixer.mixer_heads_backward(*args, out=out)
        elif kind in ("diag_fwd", "diag_bwd"):
            if how == "op":
                results[name] = (diag_memberships if kind == "diag_fwd" else diag_memberships_backward)(*args)
            else:  # the launcher with poisoned outputs: (a, z, π, ‖col‖²) forward, ā backward
                diag = _dispatch.triton_module(torch.empty(0), "_triton_diag")
                if kind == "diag_fwd":
                    a_w, keep, scalars, dtype = args
                    per_head = torch.full(a_w.shape[:2] + keep.shape[1:2], nan)
                    copies = (torch.full(a_w.shape, nan, dtype=dtype), torch.full(a_w.shape, nan, dtype=dtype))
                    results[name] = diag.diag_memberships(*args, out=(*copies, per_head, per_head.clone()))
                else:
                    results[name] = diag.diag_memberships_backward(*args, out=torch.full_like(args[3], nan))
        elif kind == "cast_dot":
            g, x, dtype, *scale = args  # scale: optional per-batch scales of g
            scale = scale[0] if scale else None
            if how == "op":
                results[name] = cast_dot(g, x, dtype, scale)
            else:
                results[name] = mixer.cast_dot(g, x, dtype, out=torch.full(g.shape, nan, dtype=dtype), scale=scale)
        elif kind == "pack":
            Y, F_s, dtype = args
            if how == "op":
                results[name] = expand_basis(*args)
            else:
                results[name] = mixer.expand_basis(*args, out=torch.full(Y.shape, nan, dtype=dtype))
        elif kind == "pace_mixer":
            from pace.layers.mixer import pace_mixer

            x, U, tau, alpha, beta, e_sketch, c_sketch, g, g_pi, heads, *norm = args  # norm: LayerNorm's (w, b)
            leaves = [t.clone().requires_grad_() for t in (x, U, tau, alpha, beta, *norm)]
            kw = {"residual": leaves[0], "layer_norm": (*leaves[5:], 1e-6)} if norm else {}
            out, pi = pace_mixer(*leaves[:5], e_sketch, c_sketch, num_heads=heads, eps=0.01, form=how, **kw)
            grads = torch.autograd.grad((out * g).sum() + (pi * g_pi).sum(), leaves)
            results[name] = (out.detach(), pi.detach(), grads)
        elif kind == "matmul_sum":
            C, lhs, rhs, scalars, codes, *options = args  # options: a dict of matmul_sum's keywords
            options = options[0] if options else {}
            if how == "op":
                results[name] = matmul_sum(C, lhs, rhs, scalars=scalars, codes=codes, **options)
            else:
                gemm = _dispatch.triton_module(torch.empty(0), "_triton_gemm")
                batch = max(t.shape[0] if t.dim() == 3 else 1 for t in (*lhs, *rhs))
                dtype = options.get("out_dtype") or torch.float32
                out = torch.full((batch, lhs[0].shape[-2], rhs[0].shape[-1]), nan, dtype=dtype)
                kw = {"D": options.get("D"), "batch_scale": options.get("batch_scale")}
                results[name] = gemm.matmul_sum(C, lhs, rhs, scalars, codes, batch, out=out, **kw)
        elif kind in ("ridge_grad", "radial"):  # the op, or its launcher with a poisoned output (W's shape)
            *args, kw = args if isinstance(args[-1], dict) else (*args, {})  # a last dict: keywords (half=)
            if how == "op":
                results[name] = (ridge_gradient_matrix if kind == "ridge_grad" else ridge_radial_diagonal)(*args, **kw)
            else:
                ridge_bwd = _dispatch.triton_module(torch.empty(0), "_triton_ridge_bwd")
                launch = ridge_bwd.ridge_gradient_matrix if kind == "ridge_grad" else ridge_bwd.ridge_radial_diagonal
                results[name] = launch(*args, out=torch.full(args[0].shape, nan), **kw)
        elif kind in ("norm_fwd", "norm_bwd"):  # the op, or its launcher with poisoned outputs
            from pace.kernels import layer_norm_backward, layer_norm_cast

            norm = _dispatch.triton_module(torch.empty(0), "_triton_norm")
            if how == "op":
                results[name] = (layer_norm_cast if kind == "norm_fwd" else layer_norm_backward)(*args)
            elif kind == "norm_fwd":
                x, w, b, eps, dtype = args
                stats = (torch.full(x.shape[:1], nan), torch.full(x.shape[:1], nan))
                out = (torch.full(x.shape, nan, dtype=dtype), *stats)
                results[name] = norm.layer_norm_cast(x, w, b, eps, dtype, out=out)
            else:  # how = "partialsP": P programs, each summing several row blocks
                dy, x, mean, rstd, w, r = args
                out = torch.full(x.shape, nan, dtype=x.dtype)
                results[name] = norm.layer_norm_backward(dy, x, mean, rstd, w, r, out=out, partials=int(how[8:]))
        elif kind == "memberships":
            a, col, tau = args
            if how == "op":
                results[name] = compress_memberships(a, col, tau)
            else:
                out = (torch.full(a.shape, float("nan"), dtype=a.dtype), torch.full(a.shape[:3], float("nan")))
                results[name] = module.compress_memberships(a, col, tau, out=out)
        else:
            Y, eps = args
            if how == "op":
                results[name] = normalized_gram(Y, eps)
            else:
                B, _, c = Y.shape
                out = (torch.full((B, 1, c), float("nan")), torch.full((B, c, c), float("nan")))
                results[name] = module.normalized_gram(Y, eps, out=out)
torch.save(results, sys.argv[2])
"""


def run_interpreted(cases: dict, tmp_path: pathlib.Path, timeout: float = 600) -> dict:
    """Run kernel cases under the Triton interpreter in a subprocess and return their outputs by name.

    Args:
        cases: name -> (kind, args, how) with kind "factor" (args (G,)), "gram" (args (Y, eps)), "memberships"
            (args (a, col, tau)), "mixer_fwd" or "mixer_bwd" (the arguments of pace.kernels.mixer_memberships /
            mixer_memberships_backward) and how
            "poison" (launcher, NaN-filled output buffers), "tileN" (the same with N × N tiles) or "op" (public
            custom op).
        tmp_path: Folder for the exchange files.
        timeout: Seconds before the subprocess is killed.

    Returns:
        name -> F, (scale, G), (w, π) or the mixer ops' results.
    """
    inputs, outputs = tmp_path / "kernel_inputs.pt", tmp_path / "kernel_outputs.pt"
    torch.save(cases, inputs)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("PACE_TRITON", None)
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(inputs), str(outputs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(outputs)


def spd_with_condition(batch: int, c: int, kappa: float, generator: torch.Generator) -> torch.Tensor:
    """Random SPD matrices (float64) with eigenvalues spread geometrically over [1/κ, 1] (κ exactly)."""
    V = torch.linalg.qr(torch.randn(batch, c, c, dtype=torch.float64, generator=generator)).Q
    lam = torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), c, dtype=torch.float64) if c > 1 else None
    lam = torch.ones(1, dtype=torch.float64) if lam is None else lam
    return (V * lam) @ V.mT


def ridge_gram(batch: int, m: int, c: int, eps: float, generator: torch.Generator) -> torch.Tensor:
    """``ŶᵀŶ + εI`` (float64) of random Gaussian sketches with unit columns, the form the layers produce."""
    Y = torch.randn(batch, m, c, dtype=torch.float64, generator=generator)
    Y_hat = Y / Y.norm(dim=-2, keepdim=True)
    return Y_hat.mT @ Y_hat + eps * torch.eye(c, dtype=torch.float64)


def build_for_hopper(module: str, name: str, constexprs: dict, pointers: dict, num_warps: int) -> bytes:
    """Compile kernel ``pace.kernels.<module>.<name>`` down to an sm_90 cubin (ptxas ships with Triton; no GPU).

    Arguments ending in ``_ptr`` are pointers (``pointers`` maps some to a dtype such as ``"*bf16"``, the rest are
    ``*fp32``), ``eps`` is fp32, the rest int32 unless in ``constexprs``. Skips when Triton is missing or this process
    interprets kernels.

    Returns:
        The cubin.
    """
    import importlib
    import inspect

    import pytest

    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    kernel = getattr(importlib.import_module(f"pace.kernels.{module}"), name)
    if not isinstance(kernel, JITFunction):
        pytest.skip("this process interprets Triton kernels (TRITON_INTERPRET=1)")
    signature = {}
    for arg in inspect.signature(kernel.fn).parameters:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = pointers.get(arg, "*fp32")
        else:
            signature[arg] = "fp32" if arg == "eps" else "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    return compiled.asm["cubin"]


def assert_close_elementwise(out: torch.Tensor, ref: torch.Tensor, rel: float, what: str, seed: int) -> None:
    """Elementwise |out − ref| ≤ rel·|ref| + 1e-5·max|ref| (NaN fails), naming the output and the seed."""
    out, ref = out.double(), ref.double()
    bound = rel * ref.abs() + 1e-5 * ref.abs().max().clamp_min(1e-30)
    bad = ~((out - ref).abs() <= bound)
    assert not bad.any(), f"seed {seed}: {what}: {bad.sum().item()} elements off, worst {(out - ref).abs().max():.2e}"


def pace_mixer_case(gen: torch.Generator, form: str, norm: bool = False) -> tuple[tuple, tuple]:
    """A small fused-mixer case: (float64 inputs, the "pace_mixer" runner case on their float32 copies); with
    ``norm``, a LayerNorm's weight and bias too (the mixer normalises x and adds the update to x)."""
    B, N, d, K, rank = 2, 21, 24, 3, 4
    x = torch.randn(B, N, d, generator=gen, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64)).Q
    coefficients = [torch.tensor(v, dtype=torch.float64) for v in (0.8, 0.3, 0.6)]
    sketches = [torch.randn(N, c, generator=gen, dtype=torch.float64) for c in (rank * K, rank)]
    cot = (torch.randn(B, N, d, generator=gen, dtype=torch.float64), torch.randn(B, N, K, generator=gen).double())
    inputs = (x, U, *coefficients, *sketches, *cot, K)
    if norm:
        inputs += (torch.rand(d, generator=gen, dtype=torch.float64) + 0.5, torch.randn(d, generator=gen).double())
    return inputs, ("pace_mixer", tuple(t.float() if torch.is_tensor(t) else t for t in inputs), form)


def assert_pace_mixer_matches_float64(inputs: tuple, result: tuple, form: str, seed: int) -> None:
    """The interpreted fp32 mixer's (update, π, gradients) against pace_mixer in float64 on the same inputs; with
    a norm's weight and bias in the inputs, against ``x + pace_mixer(F.layer_norm(x))`` written out."""
    from pace.layers.mixer import pace_mixer

    x, U, tau, alpha, beta, e_sketch, c_sketch, g, g_pi, K, *norm = inputs
    leaves = [t.clone().requires_grad_() for t in (x, U, tau, alpha, beta, *norm)]
    x_in = torch.nn.functional.layer_norm(leaves[0], x.shape[-1:], *leaves[5:], 1e-6) if norm else leaves[0]
    ref, ref_pi = pace_mixer(x_in, *leaves[1:5], e_sketch, c_sketch, num_heads=K, eps=0.01, form=form)
    ref = leaves[0] + ref if norm else ref
    ref_grads = torch.autograd.grad((ref * g).sum() + (ref_pi * g_pi).sum(), leaves)
    got, got_pi, got_grads = result
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    torch.testing.assert_close(got_pi.double(), ref_pi, rtol=1e-4, atol=1e-5)
    for name, a, b in zip(("x", "U", "tau", "alpha", "beta", "norm weight", "norm bias"), got_grads, ref_grads):
        err = ((a.double() - b).abs().max() / b.abs().max()).item()
        assert err < 1e-3, f"seed {seed}: gradient of {name} off by {err:.1e} of its scale"
