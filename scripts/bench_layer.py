"""Layer benchmark: forward+backward time and peak memory of one PACE block against its alternatives.

Two parts, each measured in this one process with the candidates interleaved:

1. Against the reference formulation of the same mathematics (the authors' organisation: explicit d × d and
   p × p projectors, a Python loop over heads; ``scripts/_reference_block.py``) at one configuration, for both
   Compress forms, after checking that outputs and gradients agree within float32 tolerance; matrix-product
   FLOPs of both beside the times.
2. Token scaling from 196 to 16,384 tokens: the PACE block (both forms) against a timm ViT ``Block`` of the same
   width and heads (softmax attention through SDPA plus its MLP), the attention half of that block alone, and a
   token-statistics (ToST-style) attention block; time, peak memory and the memory autograd saves.

Writes ``results.csv``, ``summary.json`` (targets and machine) and ``report.md`` under ``--out``.

    python scripts/bench_layer.py --threads 1,2 --scaling-threads 1 --out outputs/bench_layer   # CPU, ~5 minutes
    python scripts/bench_layer.py --device cuda --out outputs/bench_layer_gpu  # GPU, bf16 autocast
    python scripts/bench_layer.py --quick --out outputs/bench_quick             # smoke run, seconds

References:
    https://github.com/SHIELD-SKY/PACEAttention (the reference formulation)
    https://github.com/RobinWu218/ToST (token statistics self-attention, TSSA)
"""

import argparse
import os
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from _bench_utils import (
    MIB,
    autocast,
    command_line,
    flop_counter,
    format_checks,
    interleaved,
    machine_info,
    markdown_table,
    median_ms,
    peak_memory_bytes,
    pick_device,
    saved_tensor_bytes,
    write_results,
)
from _reference_block import ReferenceBlock
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from pace.layers import PACEAttention, PACEBlock

# Performance targets: the reference ratio (CPU, GPU), softmax ratios at 196 and 4,096 tokens, 16k/4k growth.
TARGETS = {"reference_cpu": 1.3, "reference_gpu": 2.0, "softmax_196": 1.0, "softmax_4096": 5.0, "growth": 4.5}


class SoftmaxAttentionBlock(nn.Module):
    """The attention half of a timm ViT block: pre-norm, timm ``Attention`` (SDPA), residual; no MLP."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.attn(self.norm(x))


class TokenStatisticsBlock(nn.Module):
    """Pre-norm token-statistics self-attention (ToST's TSSA) with a residual: a linear-time baseline, no MLP.

    Per head, memberships over heads come from the squared norms of the column-normalised projections, and each
    coordinate is shrunk by one plus its membership-weighted second moment over the tokens.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim, bias=False)
        self.temperature = nn.Parameter(torch.ones(num_heads, 1))
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        w = self.proj_in(self.norm(x)).view(B, N, self.num_heads, -1).transpose(1, 2)  # (B, K, N, p)
        pi = torch.softmax(F.normalize(w, dim=-2).square().sum(-1) * self.temperature, dim=1)  # (B, K, N)
        weights = pi / (pi.sum(-1, keepdim=True) + 1e-8)
        second_moment = weights.unsqueeze(-2) @ w.square()  # (B, K, 1, p)
        out = -(w * pi.unsqueeze(-1)) / (1 + second_moment)  # (B, K, N, p)
        return x + self.proj_out(out.transpose(1, 2).reshape(B, N, C))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (bf16 autocast on cuda)")
    parser.add_argument("--threads", default=None, help="CPU thread counts for part 1, e.g. 1,2 (default: all)")
    parser.add_argument("--scaling-threads", type=int, default=None, help="CPU threads of part 2 (default: all)")
    parser.add_argument("--dim", type=int, default=384, help="token width d")
    parser.add_argument("--heads", type=int, default=8, help="heads / subspaces K")
    parser.add_argument("--rank", type=int, default=20, help="PACE subspace rank r")
    parser.add_argument("--batch", type=int, default=32, help="batch of the reference comparison")
    parser.add_argument("--tokens", type=int, default=196, help="tokens of the reference comparison")
    parser.add_argument("--forms", default="full,diag", help="Compress forms compared with the reference")
    parser.add_argument("--scaling-tokens", default="196,1024,4096,16384", help="token counts of part 2")
    parser.add_argument("--scaling-batch", default=None, help="batch per token count (default: by device)")
    parser.add_argument("--softmax-max-tokens", type=int, default=None, help="skip softmax above this (CPU: 4096)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per candidate (CPU 5, GPU 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (CPU 1, GPU 5)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd PACE blocks")
    parser.add_argument(
        "--other-path",
        action="store_true",
        help="also time the PACE path the default does not take here (fused mixer on CPU, separate ops on GPU)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (smoke test)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_layer"), help="output directory")
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    if args.quick:
        args.dim, args.heads, args.rank, args.batch, args.tokens = 64, 4, 4, 2, 64
        args.scaling_tokens, args.scaling_batch = "64,256", "2,1"
        args.softmax_max_tokens = 256
        args.repeats, args.warmup = 2, 1
        args.threads = args.threads or "1"  # tiny operators: a second thread only adds synchronisation
    threads = args.threads or str(os.cpu_count())
    args.threads = [int(t) for t in threads.split(",")] if not gpu else [torch.get_num_threads()]
    args.forms = args.forms.split(",")
    args.scaling_tokens = [int(n) for n in args.scaling_tokens.split(",")]
    default_batch = {196: 128, 1024: 32, 4096: 8, 16384: 8} if gpu else {196: 32, 1024: 8, 4096: 2, 16384: 2}
    if args.scaling_batch is None:
        args.scaling_batch = [default_batch.get(n, max(1, 8192 // n)) for n in args.scaling_tokens]
    else:
        args.scaling_batch = [int(b) for b in str(args.scaling_batch).split(",")]
    if len(args.scaling_batch) != len(args.scaling_tokens):
        parser.error(f"--scaling-batch has {len(args.scaling_batch)} entries for {len(args.scaling_tokens)} counts")
    if args.softmax_max_tokens is None:
        args.softmax_max_tokens = max(args.scaling_tokens) if gpu else 4096
    args.repeats = args.repeats or (20 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    return args


def pace_block(
    args: argparse.Namespace, form: str, device: torch.device, x: Tensor, fused: bool | None = None
) -> PACEBlock:
    """A PACE block whose sketches are drawn and stored for ``x``'s token count (one training forward)."""
    block = PACEBlock(
        args.dim, args.heads, attn_layer=partial(PACEAttention, rank=args.rank, compress_form=form, fused=fused)
    ).to(device)
    with torch.no_grad(), autocast(device):
        block(x)
    return block


def step_fn(module: nn.Module, x: Tensor, grad: Tensor, device: torch.device):
    """One training step's forward+backward (gradients reset first, so no accumulation pass is timed)."""
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        with autocast(device):
            y = module(x)
        y.backward(grad.to(y.dtype))

    return step


def matmul_gflops(step) -> float:
    """FLOPs of one forward+backward in matrix products, triangular solves and Cholesky factorisations."""
    with flop_counter() as counter:
        step()
    return counter.get_total_flops() / 1e9


def agreement(ours: nn.Module, reference: nn.Module, x: Tensor) -> dict[str, float]:
    """Largest differences of outputs and gradients (x, U, τ, α, β) in float32, relative to the reference scale."""
    a, b = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    y_ours, y_ref = ours(a), reference(b)
    g = torch.randn_like(y_ref)
    y_ours.backward(g)
    y_ref.backward(g)
    attn = ours.attn
    pairs = {
        "output": (y_ours, y_ref),
        "grad_x": (a.grad, b.grad),
        "grad_U": (attn.compress.subspaces.grad, reference.subspaces.grad),
        "grad_tau": (attn.compress.tau.grad, reference.tau.grad),
        "grad_alpha": (attn.alpha.grad, reference.alpha.grad),
        "grad_beta": (attn.beta.grad, reference.beta.grad),
    }
    out = {}
    for name, (u, v) in pairs.items():
        out[name] = ((u.float() - v.float()).abs().max() / v.float().abs().max().clamp_min(1e-12)).item()
    for module in (ours, reference):
        module.zero_grad(set_to_none=True)
    return out


def reference_part(args: argparse.Namespace, device: torch.device) -> tuple[list[dict], list[str]]:
    """Part 1: our block against the reference formulation, per thread count and Compress form."""
    rows, lines = [], []
    for threads in args.threads:
        if device.type == "cpu":
            torch.set_num_threads(threads)
        for form in args.forms:
            torch.manual_seed(0)
            x = torch.randn(args.batch, args.tokens, args.dim, device=device)
            ours = pace_block(args, form, device, x)
            reference = ReferenceBlock(ours).to(device)
            with torch.autocast(device.type, enabled=False):
                diffs = agreement(ours, reference, x)
            x.requires_grad_(True)
            grad = torch.randn_like(x)
            cases = {"pace": step_fn(ours, x, grad, device), "reference": step_fn(reference, x, grad, device)}
            if args.other_path:
                fused = device.type == "cpu"  # the path the default (fused=None) does not take here
                other = pace_block(args, form, device, x.detach(), fused=fused)
                other.load_state_dict(ours.state_dict())
                cases[f"pace_{'fused' if fused else 'unfused'}"] = step_fn(other, x, grad, device)
            if args.compile:
                cases["pace_compiled"] = step_fn(torch.compile(ours), x, grad, device)
            times = interleaved(cases, repeats=args.repeats, warmup=args.warmup, device=device)
            flops = {name: matmul_gflops(fn) for name, fn in cases.items() if name != "pace_compiled"}
            base = {
                "part": "reference",
                "form": form,
                "threads": threads,
                "dim": args.dim,
                "heads": args.heads,
                "batch": args.batch,
                "tokens": args.tokens,
                "repeats": args.repeats,
            }
            ours_ms = median_ms(times["pace"]["wall"])
            for name, t in times.items():
                rows.append(
                    {
                        **base,
                        "candidate": name,
                        "wall_ms": median_ms(t["wall"]),
                        "wall_ms_min": min(t["wall"]) * 1e3,
                        "cpu_ms": median_ms(t["cpu"]),
                        "matmul_gflop": flops.get(name),
                        "time_vs_pace": median_ms(t["wall"]) / ours_ms,
                        "cpu_time_vs_pace": median_ms(t["cpu"]) / median_ms(times["pace"]["cpu"]),
                        **({f"max_rel_diff_{k}": v for k, v in diffs.items()} if name == "reference" else {}),
                    }
                )
            ratio = median_ms(times["reference"]["wall"]) / ours_ms
            lines.append(
                f"form={form} threads={threads}: pace {ours_ms:.1f} ms, reference "
                f"{median_ms(times['reference']['wall']):.1f} ms -> {ratio:.2f}x faster "
                f"(matmul FLOPs ratio {flops['reference'] / flops['pace']:.2f}); "
                f"max relative difference output {diffs['output']:.1e}, gradients "
                f"{max(v for k, v in diffs.items() if k != 'output'):.1e} ("
                + ", ".join(f"{k[5:]} {v:.1e}" for k, v in diffs.items() if k != "output")
                + ")"
            )
            print(lines[-1], flush=True)
    return rows, lines


def scaling_candidates(args: argparse.Namespace, x: Tensor, device: torch.device, softmax: bool) -> dict:
    candidates: dict[str, nn.Module] = {}
    for form in args.forms:
        candidates[f"pace_{form}"] = pace_block(args, form, device, x)
        if args.other_path:
            fused = device.type == "cpu"  # the path the default (fused=None) does not take here
            candidates[f"pace_{form}_{'fused' if fused else 'unfused'}"] = pace_block(args, form, device, x, fused)
    if softmax:
        candidates["softmax_block"] = Block(args.dim, args.heads, mlp_ratio=4.0, qkv_bias=True).to(device)
        candidates["softmax_attn"] = SoftmaxAttentionBlock(args.dim, args.heads).to(device)
    candidates["tost_attn"] = TokenStatisticsBlock(args.dim, args.heads).to(device)
    if args.compile:
        eager = candidates.get("pace_full") or pace_block(args, "full", device, x)
        candidates["pace_full_compiled"] = torch.compile(eager)
    return candidates


def scaling_part(args: argparse.Namespace, device: torch.device, rows: list[dict], save) -> None:
    """Part 2: time and memory of every candidate from the smallest to the largest token count, appended to
    ``rows``; ``save()`` is called after each token count."""
    if device.type == "cpu":
        torch.set_num_threads(args.scaling_threads or max(args.threads))
    for n, batch in zip(args.scaling_tokens, args.scaling_batch):
        torch.manual_seed(0)
        x = torch.randn(batch, n, args.dim, device=device)
        softmax = n <= args.softmax_max_tokens
        modules = scaling_candidates(args, x, device, softmax)
        x.requires_grad_(True)
        grad = torch.randn_like(x)
        steps = {name: step_fn(m, x, grad, device) for name, m in modules.items()}
        times = interleaved(steps, repeats=args.repeats, warmup=args.warmup, device=device)
        for name, module in modules.items():
            row = {
                "part": "scaling",
                "candidate": name,
                "tokens": n,
                "batch": batch,
                "dim": args.dim,
                "heads": args.heads,
                "threads": torch.get_num_threads(),
                "repeats": args.repeats,
                "wall_ms": median_ms(times[name]["wall"]),
                "wall_ms_min": min(times[name]["wall"]) * 1e3,
                "cpu_ms": median_ms(times[name]["cpu"]),
                "ms_per_image": median_ms(times[name]["wall"]) / batch,
            }
            if not args.no_memory and not name.endswith("compiled"):
                row["peak_mib"] = peak_memory_bytes(steps[name], device) / MIB
                with autocast(device):
                    row["saved_mib"] = saved_tensor_bytes(lambda m=module, x=x: m(x)) / MIB
            rows.append(row)
        pace_ms = next(r["wall_ms"] for r in rows if r["tokens"] == n and r["candidate"].startswith("pace"))
        for row in rows:
            if row["tokens"] == n:
                row["time_vs_pace_full"] = row["wall_ms"] / pace_ms
        print(
            f"tokens={n} batch={batch}: "
            + ", ".join(f"{r['candidate']} {r['wall_ms']:.1f} ms" for r in rows if r["tokens"] == n),
            flush=True,
        )
        if not softmax:
            print(f"tokens={n}: softmax attention skipped (--softmax-max-tokens {args.softmax_max_tokens})")
        save()


def summarise(args: argparse.Namespace, device: torch.device, ref_rows: list[dict], scale_rows: list[dict]) -> dict:
    """The target checks: each as the measured value, the threshold and whether it holds."""
    gpu = device.type == "cuda"
    checks: dict[str, dict] = {}
    threads = max(args.threads)
    for form in args.forms:
        row, ours = (
            next(
                (r for r in ref_rows if r["form"] == form and r["threads"] == threads and r["candidate"] == name),
                None,
            )
            for name in ("reference", "pace")
        )
        if row and ours:
            need = TARGETS["reference_gpu" if gpu else "reference_cpu"]
            checks[f"reference_over_pace_{form}"] = {
                "value": row["time_vs_pace"],
                "target": f">= {need}",
                "holds": row["time_vs_pace"] >= need,
                "cpu_time_ratio": row["cpu_time_vs_pace"],
                "min_time_ratio": row["wall_ms_min"] / ours["wall_ms_min"],
                "outputs_agree": max(v for k, v in row.items() if k.startswith("max_rel_diff")) < 1e-4,
            }

    def ms(candidate: str, n: int, per_image: bool = False, key: str = "wall_ms") -> float | None:
        row = next((r for r in scale_rows if r["candidate"] == candidate and r["tokens"] == n), None)
        if row is None:
            return None
        return row[key] / row["batch"] if per_image else row[key]

    pace = f"pace_{args.forms[0]}"
    for n, key in ((196, "softmax_196"), (4096, "softmax_4096")):
        if ms("softmax_block", n) and ms(pace, n):
            ratio = ms("softmax_block", n) / ms(pace, n)
            checks[f"softmax_block_over_pace_at_{n}"] = {
                "value": ratio,
                "target": f">= {TARGETS[key]}",
                "holds": ratio >= TARGETS[key],
                "attention_only_ratio": ms("softmax_attn", n) / ms(pace, n),
                "cpu_time_ratio": ms("softmax_block", n, key="cpu_ms") / ms(pace, n, key="cpu_ms"),
                "min_time_ratio": ms("softmax_block", n, key="wall_ms_min") / ms(pace, n, key="wall_ms_min"),
            }
    for form in args.forms:
        big, small = ms(f"pace_{form}", 16384, True), ms(f"pace_{form}", 4096, True)
        if big and small:
            checks[f"pace_{form}_time_16k_over_4k"] = {
                "value": big / small,
                "target": f"<= {TARGETS['growth']}",
                "holds": big / small <= TARGETS["growth"],
            }
    return checks


def render(args, info, ref_rows, ref_lines, scale_rows, checks, command: str) -> str:
    parts = [
        "# Layer benchmark",
        f"Command: `{command}`",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        "## Against the reference formulation",
        markdown_table(
            ref_rows,
            ["form", "threads", "candidate", "wall_ms", "cpu_ms", "time_vs_pace", "cpu_time_vs_pace", "matmul_gflop"],
        ),
        "\n".join(f"- {line}" for line in ref_lines),
        "## Token scaling",
        markdown_table(
            scale_rows,
            ["tokens", "batch", "candidate", "wall_ms", "ms_per_image", "time_vs_pace_full", "peak_mib", "saved_mib"],
        ),
        "## Targets",
        format_checks(checks),
    ]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 checks stay float32; timing runs in bf16 anyway
    command = command_line(argv)
    info = machine_info(device)
    ref_rows: list[dict] = []
    ref_lines: list[str] = []
    scale_rows: list[dict] = []

    def save() -> str:
        # Written after each part and token count: a run stopped by a time limit keeps what it measured.
        checks = summarise(args, device, ref_rows, scale_rows)
        report = render(args, info, ref_rows, ref_lines, scale_rows, checks, command)
        write_results(args.out, ref_rows + scale_rows, {"command": command, "machine": info, "targets": checks}, report)
        return report

    rows, lines = reference_part(args, device)
    ref_rows += rows
    ref_lines += lines
    save()
    scaling_part(args, device, scale_rows, save)
    print(save())
    print(f"wrote {args.out / 'results.csv'}, {args.out / 'summary.json'}, {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
