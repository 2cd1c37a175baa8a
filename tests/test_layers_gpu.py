"""PACE layers on a CUDA device: same sketch as on the CPU, no host synchronisation, bf16 autocast."""

import pytest
import torch

from pace.layers import PACEBlock

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

C, K, RANK, N = 192, 4, 20, 196


def test_cuda_draws_the_cpu_sketch():
    cpu, gpu = PACEBlock(C, K, sketch_seed=5, layer_idx=2), PACEBlock(C, K, sketch_seed=5, layer_idx=2).cuda()
    for op_cpu, op_gpu in [(cpu.attn.expand, gpu.attn.expand), (cpu.attn.compress, gpu.attn.compress)]:
        omega = op_gpu.derived_sketch(N)
        assert omega.device.type == "cuda"
        assert torch.equal(omega.cpu(), op_cpu.derived_sketch(N))


@pytest.mark.parametrize("form", ["full", "diag"])
@pytest.mark.parametrize("projector", ["ridge", "exact"])
def test_training_and_eval_steps_do_not_synchronise(form, projector):
    block = PACEBlock(C, K, rank=RANK, compress_form=form, projector=projector, drop_path=0.1).cuda()
    x = torch.randn(8, N, C, device="cuda", requires_grad=True)
    block(x).sum().backward()  # warm-up: first draw of the sketch, allocator and library handles
    block.set_epoch(1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = block(x)  # includes the redraw for epoch 1 (a pinned, asynchronous copy)
        y.float().sum().backward()
        block.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            block(x)
            block.memberships(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters())


def test_cuda_output_matches_cpu():
    cpu = PACEBlock(C, K, rank=RANK).eval()
    gpu = PACEBlock(C, K, rank=RANK).cuda().eval()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(2, N, C)
    with torch.no_grad():
        torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", ["full", "diag"])
def test_cuda_gradients_match_a_float64_cpu_computation(form):
    # The benchmark's shape (d 384, 8 heads, batch 32, 196 tokens): on one H100 run the τ gradient of the full
    # form differed from the reference formulation's by 1.8e-2 relative while every other gradient agreed to 2e-6;
    # on a CPU both agree with float64 to 1.5e-5. This pins down whether our CUDA gradients are the ones off.
    torch.manual_seed(0)
    cpu = PACEBlock(384, 8, compress_form=form).double()
    gpu = PACEBlock(384, 8, compress_form=form).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x, g = torch.randn(32, N, 384, dtype=torch.float64), torch.randn(32, N, 384, dtype=torch.float64)
    results = []
    for block, device, dtype in [(cpu, "cpu", torch.float64), (gpu, "cuda", torch.float32)]:
        inputs = x.to(device, dtype, copy=True).requires_grad_()
        block(inputs).backward(g.to(device, dtype))
        grads = {name: p.grad.double().cpu() for name, p in block.named_parameters()}
        results.append({"x": inputs.grad.double().cpu(), **grads})
    expected, got = results
    for name, value in expected.items():
        scale = value.abs().max().clamp_min(1e-12)
        assert (got[name] - value).abs().max() / scale < 1e-4, name
