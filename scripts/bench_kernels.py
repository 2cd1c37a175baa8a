"""Micro-benchmark of pace.kernels' Triton ridge kernels against the PyTorch (torch.linalg) path.

    python scripts/bench_kernels.py [--out results.json]   # CUDA: times each case, prints speed-up ratios
    python scripts/bench_kernels.py --sweep                # CUDA: also each (tile, num_warps) of the factor
    python scripts/bench_kernels.py --dry-run              # CPU: tiny sizes through the Triton interpreter

On CUDA every case runs both implementations on the same inputs in one process (``triton.testing.do_bench``,
median of its repeats) and reports torch ÷ triton (> 1: Triton is faster) and the largest difference between
the two relative to the largest torch entry. Cases: the inverse Cholesky factor (Compress: B·K = 1024 matrices of
c = 20; Expand: 128 of c = 80 / 160 / 320), the normalised Gram (Compress: (1024, 48, 20) bf16; Expand:
(128, 384, 160) bf16 and fp32) and the whole ridge basis Q = Ŷ F (Gram + factor + one product) against
``pace.layers.basis.ridge_basis``, and the Compress memberships and weights (S model: B = 128, N = 196, K = 8,
p = 48, bf16) against pace.layers.compress's op sequence, and the fused mixer's ops (memberships forward, their
backward through π and per head, expand_basis from fp32 and from bf16 sketches, cast_dot; S model, bf16) and the
block's LayerNorm around it (layer_norm_cast, layer_norm_backward: S model, 128 × 196 tokens of 384) against their
PyTorch fallbacks (bf16 outputs may round to neighbouring values: agreement within 1e-2 there, 1e-3 elsewhere).
The dry run only checks that every case runs and agrees; its timings mean nothing. Exit code 1 when the two disagree.
"""

import argparse
import json
import os
import sys

if __name__ == "__main__" and "--dry-run" in sys.argv:
    # The interpreter must be chosen before triton is first imported (torch imports it).
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from pace.kernels import (  # noqa: E402
    _dispatch,
    cast_dot_reference,
    diag_memberships_backward_reference,
    diag_memberships_reference,
    expand_basis_reference,
    inverse_cholesky_factor_reference,
    layer_norm_backward_reference,
    layer_norm_cast_reference,
    mixer_heads_backward_reference,
    mixer_memberships_backward_reference,
    mixer_memberships_reference,
    normalized_gram_reference,
)
from pace.layers.basis import ridge_basis  # noqa: E402

EPS = 0.01
FULL = {
    "factor": [(1024, 20), (128, 80), (128, 160), (128, 320)],
    "gram": [(1024, 48, 20, "bf16"), (128, 384, 160, "bf16"), (128, 384, 160, "fp32")],
    "basis": [(1024, 48, 20, "bf16"), (128, 384, 160, "bf16")],
    "memberships": [(128, 196, 8, 48, "bf16")],
    "mixer": [(128, 196, 8, 20, 48, "bf16")],
    "norm": [(128, 196, 384)],
}
DRY = {
    "factor": [(4, 20), (2, 40)],
    "gram": [(4, 48, 20, "bf16"), (2, 70, 40, "fp32")],
    "basis": [(2, 48, 20, "bf16")],
    "memberships": [(2, 10, 8, 48, "bf16")],
    "mixer": [(2, 20, 3, 5, 6, "bf16")],
    "norm": [(2, 21, 48)],
}
# (tile, num_warps, num_stages)
SWEEP = [(16, 1, 1), (16, 2, 1), (16, 4, 1), (32, 1, 1), (32, 2, 1), (32, 4, 1), (32, 4, 2), (64, 4, 1), (64, 8, 1)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _time_ms(fn, device: torch.device) -> float:
    if device.type != "cuda":
        import time

        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def _sketches(batch: int, m: int, c: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Low-rank-plus-noise columns, like sketches of token matrices: realistic conditioning of the Gram.
    rank = max(1, c // 2)
    Y = torch.randn(batch, m, rank, device=device) @ torch.randn(batch, rank, c, device=device)
    return (Y + 0.05 * torch.randn(batch, m, c, device=device)).to(dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU smoke check through the Triton interpreter")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    parser.add_argument(
        "--sweep", action="store_true", help="also time the factor kernel at each tile size and warp count"
    )
    args = parser.parse_args()
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: use --dry-run on a CPU machine")
    torch.manual_seed(0)
    module = _dispatch.triton_module(torch.empty(0, device=device)) if not args.dry_run else None
    if args.dry_run:
        with _dispatch.use_backend("interpret"):
            module = _dispatch.triton_module(torch.empty(0))
    if module is None:
        raise SystemExit("Triton is not available")
    cases = DRY if args.dry_run else FULL
    rows = []

    for batch, c in cases["factor"]:
        Y = _sketches(batch, 2 * c, c, torch.float32, device)
        _, G = normalized_gram_reference(Y, EPS)
        triton_fn, torch_fn = (
            (lambda G=G: module.inverse_cholesky_factor(G)),
            (lambda G=G: inverse_cholesky_factor_reference(G)),
        )
        rows.append(_compare(f"factor B={batch} c={c}", triton_fn, torch_fn, device))
        for tile, warps, stages in SWEEP if args.sweep else ():
            rows.append(
                _compare(
                    f"  tile={tile} warps={warps} stages={stages}",
                    lambda G=G, tile=tile, warps=warps, stages=stages: module.inverse_cholesky_factor(
                        G, tile=tile, num_warps=warps, num_stages=stages
                    ),
                    torch_fn,
                    device,
                )
            )

    for batch, m, c, dt in cases["gram"]:
        Y = _sketches(batch, m, c, DTYPES[dt], device)
        rows.append(
            _compare(
                f"gram B={batch} m={m} c={c} {dt}",
                lambda Y=Y: module.normalized_gram(Y, EPS),
                lambda Y=Y: normalized_gram_reference(Y, EPS),
                device,
            )
        )

    for batch, m, c, dt in cases["basis"]:
        Y = _sketches(batch, m, c, DTYPES[dt], device)

        def triton_basis(Y=Y):
            scale, G = module.normalized_gram(Y, EPS)
            F = module.inverse_cholesky_factor(G)
            return Y.float() @ (F / scale.mT)  # Ŷ F with the column scales folded into F's rows

        rows.append(
            _compare(f"basis B={batch} m={m} c={c} {dt}", triton_basis, lambda Y=Y: ridge_basis(Y, eps=EPS), device)
        )

    for batch, n, k, p, dt in cases["memberships"]:
        # Head-major storage (B·K, N, p), as pace.layers.compress holds a and col.
        a = torch.randn(batch * k, n, p, device=device).to(DTYPES[dt]).view(batch, k, n, p).transpose(1, 2)
        col = (0.5 * torch.randn(batch * k, n, p, device=device)).to(DTYPES[dt]).view(batch, k, n, p).transpose(1, 2)
        tau = torch.tensor(0.4, device=device)
        rows.append(
            _compare(
                f"memberships B={batch} N={n} K={k} p={p} {dt}",
                lambda a=a, col=col, tau=tau: module.compress_memberships(a, col, tau),
                lambda a=a, col=col, tau=tau: _memberships_today(a, col, tau),
                device,
                tol=1e-2,
            )
        )

    mixer_module = _dispatch.triton_module(torch.empty(0, device=device), "_triton_mixer")
    if args.dry_run:
        with _dispatch.use_backend("interpret"):
            mixer_module = _dispatch.triton_module(torch.empty(0), "_triton_mixer")
    diag_module = _dispatch.triton_module(torch.empty(0, device=device), "_triton_diag")
    if args.dry_run:
        with _dispatch.use_backend("interpret"):
            diag_module = _dispatch.triton_module(torch.empty(0), "_triton_diag")
    for batch, n, k, r, p, dt in cases["mixer"]:
        rows.extend(_mixer_cases(mixer_module, batch, n, k, r, p, DTYPES[dt], device))
        rows.extend(_diag_cases(diag_module, batch, n, k, r, p, DTYPES[dt], device))
    norm_module = _dispatch.triton_module(torch.empty(0, device=device), "_triton_norm")
    if args.dry_run:
        with _dispatch.use_backend("interpret"):
            norm_module = _dispatch.triton_module(torch.empty(0), "_triton_norm")
    for batch, n, d in cases["norm"]:
        rows.extend(_norm_cases(norm_module, batch, n, d, device))

    print(f"{'case':34s} {'triton ms':>10s} {'torch ms':>10s} {'torch/triton':>12s} {'rel diff':>10s}")
    for row in rows:
        print(
            f"{row['case']:34s} {row['triton_ms']:10.4f} {row['torch_ms']:10.4f} {row['ratio']:12.2f} "
            f"{row['max_diff']:10.2e}"
        )
    if args.dry_run:
        print("dry run (Triton interpreter on the CPU): timings are meaningless, the agreement is checked")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "rows": rows}, f, indent=2)
    bad = [row["case"] for row in rows if not row["max_diff"] <= row["tol"]]
    if bad:
        raise SystemExit(f"Triton and torch disagree (max |diff| / max |torch| above tolerance): {', '.join(bad)}")


def _mixer_cases(module, batch: int, n: int, k: int, r: int, p: int, dtype: torch.dtype, device) -> list[dict]:
    """The fused mixer's membership ops (forward, the backward's two), expand_basis and cast_dot against their
    PyTorch fallbacks."""
    a = torch.randn(batch, n, k * p, device=device).to(dtype)
    Q_c = torch.randn(batch, k, p, r, device=device) / p**0.5
    scalars = torch.tensor([0.7, 0.3, 0.6], device=device)
    _, pi, sq = mixer_memberships_reference(a, Q_c, scalars)
    g_Qe, P = (torch.randn(batch, n, k * r, device=device).to(dtype) for _ in range(2))
    g_U = torch.randn_like(a)
    bwd = (g_Qe, P, g_U, a, pi, sq, None, Q_c, scalars)  # π unused: the training path
    heads = (a, g_U, pi, mixer_memberships_backward_reference(*bwd)[0], Q_c, scalars)
    name = f"B={batch} N={n} K={k} r={r} p={p}"
    d, c = k * p, k * r
    S = torch.randn(batch, d, c + r, device=device)
    F_s = torch.randn(batch, c, c, device=device).triu() / c**0.5
    g, x = torch.randn(batch, n, d, device=device), torch.randn(batch, n, d, device=device)
    # Sketches in fp32 and in bf16 (the mixer's sketch product), each a strided view.
    packs = [
        _compare(
            f"expand basis{label} {name}",
            lambda Y=Y: module.expand_basis(Y, F_s, dtype),
            lambda Y=Y: expand_basis_reference(Y, F_s, dtype),
            device,
            tol=1e-2,
        )
        for label, Y in (("", S[..., :c]), (", bf16 sketches", S.bfloat16()[..., :c]))
    ]
    return (
        packs
        + [
            _compare(
                f"cast dot {name}",
                lambda: module.cast_dot(g, x, dtype),
                lambda: cast_dot_reference(g, x, dtype),
                device,
            ),
        ]
        + [
            # Each rounds once to bf16 (the kernel from fp32 sums in another order): one ulp apart at most.
            _compare(
                f"mixer {label} {name}",
                lambda f=f, args=args: f(*args),
                lambda r=r, args=args: r(*args),
                device,
                tol=1e-2,
            )
            for label, f, r, args in (
                ("memberships", module.mixer_memberships, mixer_memberships_reference, (a, Q_c, scalars)),
                ("memberships bwd", module.mixer_memberships_backward, mixer_memberships_backward_reference, bwd),
                ("heads bwd", module.mixer_heads_backward, mixer_heads_backward_reference, heads),
            )
        ]
    )


def _norm_cases(module, batch: int, n: int, d: int, device) -> list[dict]:
    """The block's LayerNorm kernels (forward to bf16, backward from a bf16 x̄ with the residual's cotangent added)
    against ATen's LayerNorm, its copy to bf16, its backward and the add."""
    x = torch.randn(batch * n, d, device=device) * 2 + 0.5
    w, b = torch.rand(d, device=device) + 0.5, torch.randn(d, device=device)
    _, mean, rstd = layer_norm_cast_reference(x, w, b, 1e-6, torch.bfloat16)
    dy, r = torch.randn_like(x).bfloat16(), torch.randn_like(x)
    name = f"T={batch * n} C={d}"
    return [
        _compare(
            f"layer norm cast {name}",
            lambda: module.layer_norm_cast(x, w, b, 1e-6, torch.bfloat16),
            lambda: layer_norm_cast_reference(x, w, b, 1e-6, torch.bfloat16),
            device,
            tol=1e-2,  # one bf16 rounding of the normalised tokens each
        ),
        _compare(
            f"layer norm bwd {name}",
            lambda: module.layer_norm_backward(dy, x, mean, rstd, w, r),
            lambda: layer_norm_backward_reference(dy, x, mean, rstd, w, r),
            device,
        ),
    ]


def _diag_cases(module, batch: int, n: int, k: int, r: int, p: int, dtype: torch.dtype, device) -> list[dict]:
    """The fused mixer's diag-form membership ops (forward, backward) against their PyTorch fallbacks."""
    a_w = torch.randn(batch, n, k * p, device=device)
    keep = (torch.randn(batch, k, p, r, device=device) / r).square().sum(-1)
    scalars = torch.tensor([0.7, 0.3, 0.6], device=device)
    a, _, pi, sq = diag_memberships_reference(a_w, keep, scalars, dtype)
    g_Qe, P_e = (
        torch.randn(batch, n, k * r, device=device).to(dtype),
        torch.randn(batch, n, k * r, device=device).to(dtype),
    )
    bwd = (g_Qe, P_e, torch.randn_like(a), a, pi, sq, None, keep, scalars)
    name = f"B={batch} N={n} K={k} p={p}"
    return [
        _compare(
            f"diag memberships {name}",
            lambda: module.diag_memberships(a_w, keep, scalars, dtype),
            lambda: diag_memberships_reference(a_w, keep, scalars, dtype),
            device,
            tol=1e-2,  # one bf16 rounding of z in the kernel, three in the fallback
        ),
        _compare(
            f"diag memberships bwd {name}",
            lambda: module.diag_memberships_backward(*bwd),
            lambda: diag_memberships_backward_reference(*bwd),
            device,
            tol=1e-2,
        ),
    ]


def _memberships_today(a: torch.Tensor, col: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # pace.layers.compress's op sequence on head-major (B·K, N, p) tensors (a, col are transposed views of them).
    B, N, K, p = a.shape
    a_h, col_h = a.transpose(1, 2), col.transpose(1, 2)  # (B, K, N, p) views of the head-major storage
    norms = torch.linalg.vector_norm(col_h, dim=-1, dtype=torch.float32)
    pi = torch.softmax(norms / tau, dim=1)  # (B, K, N)
    w = ((a_h - col_h) * pi.unsqueeze(-1).to(a.dtype)).transpose(1, 2).reshape(B, N, K, p)
    return w, pi.transpose(1, 2)


def _compare(name: str, triton_fn, torch_fn, device: torch.device, tol: float = 1e-3) -> dict:
    out_triton, out_torch = triton_fn(), torch_fn()
    if isinstance(out_triton, torch.Tensor):
        out_triton, out_torch = (out_triton,), (out_torch,)
    diff = max(
        ((a.double() - b.double()).abs().max() / b.double().abs().max()).item() for a, b in zip(out_triton, out_torch)
    )
    t_triton, t_torch = _time_ms(triton_fn, device), _time_ms(torch_fn, device)
    return {
        "case": name,
        "triton_ms": t_triton,
        "torch_ms": t_torch,
        "ratio": t_torch / t_triton,
        "max_diff": diff,
        "tol": tol,
    }


if __name__ == "__main__":
    main()
