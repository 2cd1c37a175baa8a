"""The op/byte/FLOP counter behind scripts/count_ops.py, against hand counts."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from _op_counter import count_ops, extrapolate  # noqa: E402


def test_counts_of_a_small_function_match_a_hand_count():
    x = torch.randn(4, 8)
    w = torch.randn(3, 8)
    bias = torch.randn(3)

    def fn():
        y = x @ w.t()  # a view (t) then mm: 4×8 and 8×3 in, 4×3 out
        z = torch.relu(y + bias.expand(4, 3))  # expand is a view; add reads the bias once (stride 0)
        return z.sum()

    count = count_ops(fn)
    assert [r.name for r in count.records] == ["mm", "add", "relu", "sum"]
    f4 = 4  # bytes per float32
    expected = {
        "mm": (32 + 24 + 12) * f4,
        "add": (12 + 3 + 12) * f4,
        "relu": (12 + 12) * f4,
        "sum": (12 + 1) * f4,
    }
    assert {r.name: r.bytes for r in count.records} == expected
    assert count.bytes == sum(expected.values())
    assert count.flops == 2 * 4 * 8 * 3
    assert count.ops == 4


def test_backward_ops_dtype_copies_and_small_linalg_are_counted():
    a = torch.randn(2, 5, 5, dtype=torch.float64)
    g = (a @ a.mT + 5 * torch.eye(5, dtype=torch.float64)).requires_grad_()

    def fn():
        chol = torch.linalg.cholesky_ex(g).L
        chol.float().sum().backward()

    count = count_ops(fn)
    names = count.names()
    assert names["linalg_cholesky_ex"] == 1
    assert names["_to_copy"] >= 2  # float64 -> float32 forward, and the gradient back to float64
    cholesky = next(r for r in count.records if r.name == "linalg_cholesky_ex")
    assert cholesky.flops == 2 * 5**3 // 3
    assert cholesky.category == "small linalg"
    assert {r.category for r in count.records if r.name == "_to_copy"} == {"dtype copy"}


def test_extrapolation_is_exact_for_an_affine_cost_and_refuses_batch_dependent_ops():
    w = torch.randn(6, 6)

    def run(batch):
        x = torch.randn(batch, 6)
        return count_ops(lambda: (x @ w).exp())

    small, large, target = run(2), run(4), run(10)
    line = extrapolate(small, large, 2, 4, 10)
    assert line["ops"] == target.ops
    assert line["bytes"] == pytest.approx(target.bytes)
    assert line["flops"] == pytest.approx(target.flops)
    with pytest.raises(ValueError, match="op count depends on the batch"):
        extrapolate(small, count_ops(lambda: torch.randn(3).exp().exp()), 2, 4, 10)


def test_a_custom_op_counts_as_its_fused_kernel_or_as_its_fallback():
    from pace.kernels import normalized_gram

    Y = torch.randn(2, 30, 5)
    fused = count_ops(lambda: normalized_gram(Y, 0.01))
    # One op: Y read once, the scales (2, 1, 5) and G (2, 5, 5) written once, float32.
    assert [(r.name, r.category) for r in fused.records] == [("normalized_gram", "pace kernel")]
    assert fused.bytes == (2 * 30 * 5 + 2 * 5 + 2 * 5 * 5) * 4
    fallback = count_ops(lambda: normalized_gram(Y, 0.01), kernels="fallback")
    assert "normalized_gram" not in fallback.names() and fallback.ops > 3 and fallback.bytes > fused.bytes
    with pytest.raises(ValueError, match="kernels must be one of"):
        count_ops(lambda: None, kernels="triton")


def test_the_fused_block_runs_the_mixer_kernels_once_each():
    """The counter's GPU-path proxy: each pace:: op of the fused block (full form) once per step, bf16 autocast."""
    from collections import Counter
    from functools import partial

    from pace.layers import PACEAttention, PACEBlock

    block = PACEBlock(32, 4, attn_layer=partial(PACEAttention, rank=4, fused=True))
    x = torch.randn(2, 16, 32, requires_grad=True)

    def step():
        block.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = block(x)
        y.float().sum().backward()

    step()  # draws the sketches
    fused, fallback = count_ops(step), count_ops(step, kernels="fallback")
    kernels = Counter(r.name for r in fused.records if r.category == "pace kernel")
    assert kernels == {
        "normalized_gram": 2,
        "inverse_cholesky_factor": 2,
        "pack_bases": 1,
        "mixer_memberships": 1,
        "mixer_memberships_backward": 1,
        "cast_dot": 1,
        "matmul_sum": 3,  # GEMM 2, R̄ and x̄
        "ridge_gradient_matrix": 2,  # both ridge backwards: c = 16 and 4 fit the register tile (c ≤ 32)
    }
    assert fallback.ops > fused.ops + 40 and fallback.bytes > fused.bytes
