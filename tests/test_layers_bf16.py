"""bf16 autocast numerics of the PACE mixer on the CPU: the twin of ``tests/test_layers_mixer_gpu.py``.

On the H200 (2026-12-04, docs/benchmarks.md) and on the CPU the bf16 errors of the same inputs agreed to two
digits, so the precision of the formulation can be held here, on the GPU test's three seeds. Scalar gradients are
compared with their scale σ = ‖∂(out, π)/∂θ‖, as the GPU test defines it (the gradient compared is that of
⟨g, out⟩ + ⟨g_π, π⟩). On seeds 0–5 every path stays within 1.8e-2 except the fused full form's β on seed 5
(2.2e-2); the τ gradient has a floor set by the bf16 tokens and U alone (docs/benchmarks.md).
"""

import pytest
import torch
from test_layers_mixer_gpu import LIMITS, NAMES, _case, _grads, _sigma


def _errors(form: str, fused: bool, seed: int) -> dict[str, float]:
    leaves, sketches, cotangents = _case(seed)
    ref_out, ref_grads = _grads(leaves, sketches, cotangents, form=form, fused=False, device="cpu",
                                dtype=torch.float64, autocast=False)  # fmt: skip
    sigmas = {i: _sigma(leaves, sketches, i, form) for i in (2, 3, 4)}
    out, grads = _grads(leaves, sketches, cotangents, form=form, fused=fused, device="cpu", dtype=torch.float32,
                        autocast=True)  # fmt: skip
    errors = {"out": ((out - ref_out).abs().max() / ref_out.abs().max()).item()}
    for i, (name, a, b) in enumerate(zip(NAMES, grads, ref_grads)):
        scale = sigmas[i] if i in sigmas else b.abs().max().item()
        errors[name] = ((a - b).abs().max() / scale).item()
    return errors


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("form", ["full", "diag"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "separate"])
def test_bf16_outputs_and_gradients_match_float64(form, fused, seed):
    errors = _errors(form, fused, seed=seed)
    for name, error in errors.items():
        assert error <= LIMITS["bf16"], (name, error, errors)
    # Not vacuous: bf16 rounding of the tokens alone leaves errors above float32's.
    assert max(errors.values()) > LIMITS["fp32"]
