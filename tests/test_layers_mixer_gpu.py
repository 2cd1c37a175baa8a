"""Numerics of the PACE mixer on CUDA against a float64 CPU computation (fused and separate paths, fp32 and bf16).

Scalar gradients (τ, α, β) are compared relative to their scale σ = ‖∂y/∂θ‖ (the typical size of ⟨g, ∂y/∂θ⟩
under a standard normal cotangent g), tensors relative to their largest entry: on near-degenerate inputs a
scalar gradient can be tiny next to σ, and an error relative to its own value would then measure nothing.
"""

import pytest
import torch

from pace.layers import pace_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

B, N, C, K, RANK = 32, 196, 384, 8, 20
NAMES = ("x", "U", "tau", "alpha", "beta")
LIMITS = {"fp32": 1e-4, "bf16": 2e-2}


def _case(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, C, generator=gen, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(C, C, generator=gen, dtype=torch.float64)).Q
    scalars = [torch.tensor(v, dtype=torch.float64) for v in (1.0, 0.1, 0.1)]
    sketches = torch.randn(N, RANK * K, generator=gen, dtype=torch.float64), torch.randn(N, RANK, generator=gen)
    cotangents = torch.randn(B, N, C, generator=gen, dtype=torch.float64), torch.randn(B, N, K, generator=gen)
    return (x, U, *scalars), (sketches[0], sketches[1].double()), cotangents


def _grads(leaves, sketches, cotangents, *, form, fused, device, dtype, autocast):
    leaves = [t.to(device, dtype).requires_grad_() for t in leaves]
    sketches = [s.to(device, dtype) for s in sketches]
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        out, pi = pace_attention(*leaves, *sketches, num_heads=K, eps=0.01, form=form, fused=fused)
    g, g_pi = (c.to(device, out.dtype) for c in cotangents)
    grads = torch.autograd.grad((out * g).sum() + (pi.to(out.dtype) * g_pi).sum(), leaves)
    return out.double().cpu(), [t.double().cpu() for t in grads]


def _sigma(leaves, sketches, index, form, h=1e-6):
    # ‖∂y/∂θ‖ of a scalar θ by a central difference in float64, where y = (out, π): the gradient compared is that of
    # ⟨g, out⟩ + ⟨g_π, π⟩ (both cotangents standard normal), whose typical size is the norm over both outputs.
    # π depends on τ only (∂π/∂α = ∂π/∂β = 0); for τ it is about twice the output's part.
    def y(delta):
        moved = [t + delta if i == index else t for i, t in enumerate(leaves)]
        out, pi = pace_attention(*moved, *sketches, num_heads=K, eps=0.01, form=form, fused=False)
        return torch.cat([out.flatten(), pi.flatten()])

    return ((y(h) - y(-h)) / (2 * h)).norm().item()


@pytest.mark.parametrize("form", ["full", "diag"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "separate"])
def test_cuda_outputs_and_gradients_match_float64(form, fused):
    rows = []
    for seed in range(3):
        leaves, sketches, cotangents = _case(seed)
        ref_out, ref_grads = _grads(leaves, sketches, cotangents, form=form, fused=False, device="cpu",
                                    dtype=torch.float64, autocast=False)  # fmt: skip
        sigmas = {i: _sigma(leaves, sketches, i, form) for i in (2, 3, 4)}
        for precision, autocast in (("fp32", False), ("bf16", True)):
            out, grads = _grads(leaves, sketches, cotangents, form=form, fused=fused, device="cuda",
                                dtype=torch.float32, autocast=autocast)  # fmt: skip
            errors = {"out": ((out - ref_out).abs().max() / ref_out.abs().max()).item()}
            for i, (name, a, b) in enumerate(zip(NAMES, grads, ref_grads)):
                scale = sigmas[i] if i in sigmas else b.abs().max().item()
                errors[name] = ((a - b).abs().max() / scale).item()
            rows.append((seed, precision, errors))
    for seed, precision, errors in rows:
        print(f"numerics form={form} fused={fused} seed={seed} {precision}: "
              + " ".join(f"{k} {v:.1e}" for k, v in errors.items()))  # fmt: skip
    for seed, precision, errors in rows:
        worst = max(errors.values())
        assert worst <= LIMITS[precision], (seed, precision, errors)
