"""White-box analysis library: membership maps, per-layer rates against direct log-determinants, spectra,
telemetry that leaves a training model untouched, and the PNG figures."""

import copy
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

import pace  # noqa: F401  (registers the models)
from pace.analysis import (
    block_coefficients,
    block_outputs,
    covariance_spectrum,
    effective_rank,
    is_pace_model,
    layer_rates,
    layer_telemetry,
    membership_maps,
    segmentation,
)
from pace.analysis.plots import plot_coefficients, plot_membership_grid, plot_rates, plot_spectra
from pace.layers import SketchedModule

MODEL = "pace_vit_test"  # d 64, 4 blocks, K 2, patch 8


def _model(**kwargs) -> nn.Module:
    model = timm.create_model(MODEL, **kwargs)
    with torch.no_grad():  # distinct coefficients per block, so a mixed-up block index shows
        for i, blk in enumerate(model.blocks):
            blk.attn.alpha.fill_(0.1 + 0.05 * i)
            blk.attn.beta.fill_(0.2 - 0.03 * i)
            blk.attn.compress.tau.fill_(1.0 + 0.25 * i)
    return model


def _eval_forward_with_hooks(model: nn.Module, images: torch.Tensor, *, pre: bool, record) -> list[torch.Tensor]:
    """What ``record`` returns for each block during a plain eval forward of ``model``."""
    seen = []
    if pre:
        handles = [blk.register_forward_pre_hook(lambda m, a: seen.append(record(m, a[0]))) for blk in model.blocks]
    else:
        handles = [blk.register_forward_hook(lambda m, a, o: seen.append(record(m, o))) for blk in model.blocks]
    model.eval()
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    return seen


def _outputs_by_hooks(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Each block's output from forward hooks (independent of forward_intermediates)."""
    return _eval_forward_with_hooks(model, images, pre=False, record=lambda m, out: out.detach())


def _inputs_memberships(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """π (B, N, K) of each block, from the block's own ``memberships`` on its input captured by a pre-hook."""
    return _eval_forward_with_hooks(model, images, pre=True, record=lambda m, x: m.memberships(x))


def _half_logdet_identity_plus(M: torch.Tensor) -> float:
    return 0.5 * torch.logdet(torch.eye(M.shape[0], dtype=torch.float64) + M).item()


def _direct_rates(Z: torch.Tensor, U: torch.Tensor, K: int, eps: float) -> tuple[float, float]:
    """R and R_c of one image's tokens Z (N, C) in the n × n form of the spec (no shared code with pace)."""
    Z, U = Z.double(), U.double()
    N, C = Z.shape
    p = C // K
    R = _half_logdet_identity_plus(C / (N * eps**2) * Z @ Z.T)  # I_n + d/(n ε²) ZᵀZ, tokens as columns
    Rc = 0.0
    for k in range(K):
        A = Z @ U[:, k * p : (k + 1) * p]  # (N, p): U_kᵀ z for every token
        Rc += _half_logdet_identity_plus(p / (N * eps**2) * A @ A.T)
    return R, Rc


# ----------------------------------------------------------------------------------------------------------------
# memberships


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
@pytest.mark.parametrize("hw", [(64, 64), (48, 80)])
def test_membership_maps_have_the_image_size_and_sum_to_one_over_heads(interpolation, hw):
    model = _model()
    images = torch.randn(2, 3, *hw)
    maps = membership_maps(model, images, blocks=[0, -1], interpolation=interpolation)
    assert sorted(maps) == [0, 3]
    for pi in maps.values():
        assert pi.shape == (2, 2, *hw)
        assert pi.min() >= 0 and pi.max() <= 1
        torch.testing.assert_close(pi.sum(1), torch.ones(2, *hw), rtol=0, atol=1e-5)
    assert membership_maps(model, images[0], blocks=[1], size=(30, 20))[1].shape == (1, 2, 30, 20)


def test_membership_maps_at_token_resolution_are_the_blocks_own_memberships():
    model = _model()
    images = torch.randn(2, 3, 64, 48)
    expected = _inputs_memberships(model, images)  # (B, N, K) per block, N = 8 x 6 tokens
    maps = membership_maps(model, images, size=(8, 6), interpolation="nearest")
    for i, pi in enumerate(expected):
        torch.testing.assert_close(maps[i], pi.transpose(1, 2).reshape(2, 2, 8, 6), rtol=0, atol=1e-6)
        torch.testing.assert_close(pi.sum(-1), torch.ones(2, 48), rtol=0, atol=1e-6)  # every token sums to one


def test_segmentation_is_the_argmax_head():
    maps = torch.tensor([[[0.2, 0.7]], [[0.5, 0.1]], [[0.3, 0.2]]]).unsqueeze(0)  # (1, K=3, 1, 2)
    assert segmentation(maps).tolist() == [[[1, 0]]]


def test_bad_arguments_are_named():
    model = _model()
    with pytest.raises(ValueError, match=r"block indices \[4\] are out of range .* 4 PACE blocks"):
        membership_maps(model, torch.randn(1, 3, 64, 64), blocks=[4])
    with pytest.raises(ValueError, match="interpolation must be one of"):
        membership_maps(model, torch.randn(1, 3, 64, 64), interpolation="bicubic")
    with pytest.raises(TypeError, match="no PACE blocks"):
        layer_rates(nn.Sequential(nn.Linear(2, 2)), torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="eps must be positive"):
        layer_rates(model, torch.randn(1, 3, 64, 64), eps=0.0)


def test_is_pace_model_tells_pace_vit_from_baselines_and_wrappers():
    model = _model()
    wrapper = nn.Module()
    wrapper.module = model  # as DistributedDataParallel holds it
    assert is_pace_model(model)
    assert not is_pace_model(wrapper)
    assert not is_pace_model(timm.create_model("test_vit", img_size=64, patch_size=8))


# ----------------------------------------------------------------------------------------------------------------
# rates, coefficients, spectra


@pytest.mark.parametrize("eps", [0.5, 0.2])
def test_rates_equal_direct_logdets_of_each_blocks_tokens(eps):
    model = _model()
    images = torch.randn(3, 3, 64, 64)
    tokens = _outputs_by_hooks(model, images)
    rates = layer_rates(model, images, eps=eps)
    telemetry = layer_telemetry(model, images, eps=eps)
    assert sorted(rates) == [0, 1, 2, 3]
    for i, Z in enumerate(tokens):
        U, K = model.blocks[i].attn.compress.subspaces.detach(), 2
        direct = torch.tensor([_direct_rates(Z[b], U, K, eps) for b in range(3)], dtype=torch.float64)  # (B, 2)
        torch.testing.assert_close(rates[i]["R"], direct[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rates[i]["Rc"], direct[:, 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rates[i]["dR"], direct[:, 0] - direct[:, 1], rtol=1e-5, atol=1e-5)
        assert telemetry[f"pace/block{i}/R"] == pytest.approx(direct[:, 0].mean().item(), rel=1e-5)
        assert telemetry[f"pace/block{i}/Rc"] == pytest.approx(direct[:, 1].mean().item(), rel=1e-5)
        assert telemetry[f"pace/block{i}/dR"] == pytest.approx((direct[:, 0] - direct[:, 1]).mean().item(), abs=1e-4)


def test_block_outputs_of_chosen_blocks_match_the_plain_forward():
    model = _model()
    images = torch.randn(2, 3, 64, 64)
    tokens = _outputs_by_hooks(model, images)
    out = block_outputs(model, images, blocks=[2, -3])
    assert sorted(out) == [1, 2]
    for i in (1, 2):
        torch.testing.assert_close(out[i], tokens[i], rtol=0, atol=0)


@pytest.mark.parametrize("positive_coeffs", [False, True])
def test_coefficients_are_the_effective_values_per_block(positive_coeffs):
    model = timm.create_model(MODEL, positive_coeffs=positive_coeffs)
    with torch.no_grad():
        for i, blk in enumerate(model.blocks):
            blk.attn.alpha.fill_(0.3 * i - 0.4)
            blk.attn.beta.fill_(0.1 * i)
    coeffs = block_coefficients(model)
    for i, c in enumerate(coeffs):
        a_raw, b_raw = 0.3 * i - 0.4, 0.1 * i
        softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
        a, b = (softplus(a_raw), softplus(b_raw)) if positive_coeffs else (a_raw, b_raw)
        assert c == pytest.approx({"alpha": a, "beta": b, "tau": 1.0}, rel=1e-6, abs=1e-7)


def test_covariance_spectrum_matches_numpy_and_effective_rank_bounds():
    tokens = torch.randn(3, 50, 12) * torch.linspace(0.1, 3, 12)
    expected = np.mean([np.linalg.eigvalsh(np.cov(t.numpy(), rowvar=False, bias=True))[::-1] for t in tokens], 0)
    spectrum = covariance_spectrum(tokens)
    np.testing.assert_allclose(spectrum.numpy(), expected, rtol=1e-5, atol=1e-7)
    assert (spectrum[:-1] >= spectrum[1:]).all()
    assert effective_rank(torch.ones(12)) == pytest.approx(12.0)
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(4)) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# telemetry during training


def _forward_backward(model: nn.Module, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)  # same images, targets and drop-path draws for a model and its twin
    images, targets = torch.randn(4, 3, 64, 64), torch.randint(0, 1000, (4,))
    loss = nn.functional.cross_entropy(model(images), targets)
    loss.backward()
    return loss.detach()


def _snapshot(model: nn.Module) -> dict:
    sketched = [m for m in model.modules() if isinstance(m, SketchedModule)]
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "flags": [m.training for m in model.modules()],
        "sketch": [(m.epoch, m.step, m._stored_current, m.sketch.data_ptr()) for m in sketched],
        "rng": torch.get_rng_state(),
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    assert a["grads"].keys() == b["grads"].keys() and all(torch.equal(a["grads"][n], b["grads"][n]) for n in a["grads"])
    assert a["flags"] == b["flags"]
    assert a["sketch"] == b["sketch"]
    assert torch.equal(a["rng"], b["rng"])


@pytest.mark.parametrize("schedule", ["epoch", "step"])
def test_telemetry_leaves_training_state_untouched(schedule):
    model = _model(sketch_schedule=schedule, drop_path_rate=0.1)
    twin = copy.deepcopy(model)
    pairs = [(m, torch.optim.AdamW(m.parameters(), lr=1e-3)) for m in (model, twin)]
    for m, opt in pairs:
        m.train()
        m.patch_embed.proj[0][1].eval()  # a deliberately frozen BatchNorm must stay frozen
        _forward_backward(m, seed=1)
        opt.step()
        opt.zero_grad()
        m.set_epoch(1)  # the stored sketch is stale now: the next training forward draws epoch 1's

    def check_telemetry_is_invisible(*probes):
        before = _snapshot(model)
        for probe in probes:
            telemetry = layer_telemetry(model, probe, eps=0.5)
            assert len(telemetry) == 4 * 6 and all(math.isfinite(v) for v in telemetry.values())
        _assert_same(before, _snapshot(model))

    check_telemetry_is_invisible(torch.randn(3, 3, 64, 64))  # before the epoch's first training forward
    for m, _ in pairs:
        _forward_backward(m, seed=2)  # gradients stay in place, as between accumulation micro-batches
    check_telemetry_is_invisible(torch.randn(3, 3, 64, 64), torch.randn(2, 3, 48, 64))  # and another token count

    # The updates that follow are bit-identical to the twin's, which never saw telemetry.
    losses = []
    for m, opt in pairs:
        opt.step()
        opt.zero_grad()
        losses.append(_forward_backward(m, seed=3))
        opt.step()
    assert torch.equal(*losses)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    for (name, b), c in zip(model.named_buffers(), twin.buffers()):
        assert torch.equal(b, c), name


def test_telemetry_keys_values_and_full_precision_under_autocast():
    model = _model()
    probe = torch.randn(2, 3, 64, 64)
    telemetry = layer_telemetry(model, probe, blocks=[1, 3], prefix="white")
    assert set(telemetry) == {f"white/block{i}/{k}" for i in (1, 3) for k in ("alpha", "beta", "tau", "R", "Rc", "dR")}
    assert telemetry["white/block1/alpha"] == pytest.approx(0.15) and telemetry["white/block3/tau"] == 1.75
    assert telemetry["white/block3/beta"] == pytest.approx(0.11)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as inside a mixed-precision training step
        in_autocast = layer_telemetry(model, probe, blocks=[1, 3], prefix="white")
    assert in_autocast == telemetry


# ----------------------------------------------------------------------------------------------------------------
# figures


def _assert_png(path, min_size=(200, 150)):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG" and img.size[0] >= min_size[0] and img.size[1] >= min_size[1]
        assert np.asarray(img.convert("L")).std() > 0  # something was drawn


def test_figures_are_written_as_valid_pngs(tmp_path):
    model = _model()
    images = torch.randn(1, 3, 64, 64)
    maps = membership_maps(model, images, blocks=[0, 3])
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    rates = layer_rates(model, images)
    table = {"block": sorted(rates)}
    for key in ("R", "Rc", "dR"):
        table[key] = [rates[b][key].mean().item() for b in table["block"]]
        table[f"{key}_std"] = [0.0] * len(table["block"])
    spectra = {b: covariance_spectrum(t).tolist() for b, t in block_outputs(model, images, blocks=[0, 3]).items()}
    paths = [
        plot_membership_grid(image, {b: m[0] for b, m in maps.items()}, tmp_path / "grid.png", title="test"),
        plot_coefficients(block_coefficients(model), tmp_path / "sub" / "coefficients.png"),
        plot_rates(table, tmp_path / "rates.png", eps=0.5),
        plot_spectra(spectra, tmp_path / "spectra.png"),
    ]
    for path in paths:
        _assert_png(path)
