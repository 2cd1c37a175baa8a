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

# Each case: ("factor", G) -> F, ("gram", Y, eps) -> (scale, G) or ("memberships", a, col, tau) -> (w, π);
# "poison" fills the output buffers with NaN first, "tile16" too with 16 × 16 tiles, "op" goes through the public
# custom op under use_backend("interpret").
_RUNNER = r"""
import sys
import torch
torch.set_num_threads(1)
from pace.kernels import _dispatch, use_backend, inverse_cholesky_factor, normalized_gram, compress_memberships
cases = torch.load(sys.argv[1])
with use_backend("interpret"):
    module = _dispatch.triton_module(torch.empty(0))
    assert module is not None and _dispatch._interpreted(module), "the interpreter did not engage"
    results = {}
    for name, (kind, args, how) in cases.items():
        if kind == "factor":
            (G,) = args
            if how == "op":
                results[name] = inverse_cholesky_factor(G)
            else:
                out = torch.full(G.shape, float("nan"))
                tile = int(how[4:]) if how.startswith("tile") else None
                results[name] = module.inverse_cholesky_factor(G, out=out, tile=tile)
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
        cases: name -> (kind, args, how) with kind "factor" (args (G,)), "gram" (args (Y, eps)) or "memberships"
            (args (a, col, tau)) and how
            "poison" (launcher, NaN-filled output buffers), "tileN" (the same with N × N tiles) or "op" (public
            custom op).
        tmp_path: Folder for the exchange files.
        timeout: Seconds before the subprocess is killed.

    Returns:
        name -> F, (scale, G) or (w, π).
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
