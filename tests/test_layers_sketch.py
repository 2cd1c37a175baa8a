"""The sketch schedule: deterministic draws, redraws, checkpoints holding and restoring Ω."""

import hashlib
import os
import subprocess
import sys
from functools import partial

import pytest
import torch

from pace.layers import (
    PACEAttention,
    PACEBlock,
    derive_sketch_seed,
    expand,
    gaussian_sketch,
    reseed_sketches,
    set_eval_sketch,
    sync_sketches,
)

C, K, RANK = 32, 4, 4


def _block(layer_idx=0, dtype=None, **pace_kwargs):
    return PACEBlock(
        C, K, attn_layer=partial(PACEAttention, rank=RANK, **pace_kwargs), layer_idx=layer_idx, dtype=dtype
    )


def _sketches(block):
    return block.attn.expand.sketch.clone(), block.attn.compress.sketch.clone()


def _train_step(block, n, batch=2):
    block.train()
    block(torch.randn(batch, n, C)).sum().backward()


def _digest(t):
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def test_sketch_seed_separates_every_component():
    base = {"epoch": 0, "step": 0, "layer_idx": 0, "num_tokens": 196, "operator": "expand"}
    seeds = {derive_sketch_seed(0, **base)}
    for field, value in [("epoch", 1), ("step", 1), ("layer_idx", 1), ("num_tokens", 197), ("operator", "compress")]:
        seeds.add(derive_sketch_seed(0, **{**base, field: value}))
    seeds.add(derive_sketch_seed(1, **base))
    assert len(seeds) == 7
    assert all(0 <= s < 2**63 for s in seeds)


def test_two_ranks_draw_identical_sketches_without_communication():
    rank0, rank1 = _block(layer_idx=3, sketch_seed=7), _block(layer_idx=3, sketch_seed=7)
    torch.manual_seed(1)
    _train_step(rank0, 196)
    torch.manual_seed(2)  # the global RNG must not matter
    _train_step(rank1, 196)
    for a, b in zip(_sketches(rank0), _sketches(rank1)):
        assert a.shape[0] == 196 and torch.equal(a, b)
    other_layer = _block(layer_idx=4, sketch_seed=7)
    _train_step(other_layer, 196)
    assert not torch.equal(_sketches(other_layer)[0], _sketches(rank0)[0])


def test_sketch_is_identical_in_another_process():
    seed = derive_sketch_seed(7, epoch=2, step=0, layer_idx=3, num_tokens=196, operator="expand")
    omega = gaussian_sketch(196, 80, seed=seed)
    code = (
        "import hashlib, torch; torch.manual_seed(12345); torch.randn(1000); "
        "from pace.layers import derive_sketch_seed, gaussian_sketch; "
        "s = derive_sketch_seed(7, epoch=2, step=0, layer_idx=3, num_tokens=196, operator='expand'); "
        "print(hashlib.sha256(gaussian_sketch(196, 80, seed=s).numpy().tobytes()).hexdigest())"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == _digest(omega)


def test_derived_sketch_follows_buffer_dtype():
    block = _block(dtype=torch.float64)
    omega = block.attn.expand.derived_sketch(50)
    assert omega.dtype == torch.float64 and omega.shape == (50, RANK * K)
    torch.testing.assert_close(omega.float(), block.to(torch.float32).attn.expand.derived_sketch(50), rtol=0, atol=0)


@pytest.mark.parametrize("img_size", [224, 256, 320])
def test_eval_is_bit_identical_across_calls_and_instances(img_size):
    n = (img_size // 16) ** 2
    x = torch.randn(2, n, C)
    first = _block(sketch_seed=3).eval()
    second = _block(sketch_seed=3).eval()
    second.load_state_dict(first.state_dict())
    with torch.no_grad():
        outputs = [first(x), first(x), second(x)]
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_set_epoch_redraws_and_is_reproducible():
    block = _block()
    _train_step(block, 64)
    epoch0 = _sketches(block)
    block.set_epoch(1)
    _train_step(block, 64)
    epoch1 = _sketches(block)
    assert all(not torch.equal(a, b) for a, b in zip(epoch0, epoch1))
    block.set_epoch(0)
    _train_step(block, 64)
    assert all(torch.equal(a, b) for a, b in zip(epoch0, _sketches(block)))
    # A second training forward in the same epoch keeps the sketch.
    _train_step(block, 64)
    assert all(torch.equal(a, b) for a, b in zip(epoch0, _sketches(block)))


def test_training_at_a_new_token_count_replaces_the_buffer():
    block = _block()
    _train_step(block, 64)
    _train_step(block, 100)
    expand_sketch, compress_sketch = _sketches(block)
    assert expand_sketch.shape == (100, RANK * K) and compress_sketch.shape == (100, RANK)
    assert torch.equal(expand_sketch, block.attn.expand.derived_sketch(100))


def test_loaded_sketch_of_another_size_is_used_and_survives_eval_elsewhere():
    source = _block()
    _train_step(source, 100)
    state = source.state_dict()
    custom = torch.randn(100, RANK * K)  # not derivable from any seed
    state["attn.expand.sketch"] = custom

    target = _block()
    assert target.attn.expand.sketch.shape == (0, RANK * K)
    target.load_state_dict(state)
    assert torch.equal(target.attn.expand.sketch, custom)
    assert torch.equal(target.attn.compress.sketch, state["attn.compress.sketch"])

    expand_op = target.attn.expand.eval()
    h = torch.randn(2, 100, C)
    with torch.no_grad():
        torch.testing.assert_close(expand_op(h), expand(h, custom, eps=0.01), rtol=0, atol=0)
        derived = expand(h, expand_op.derived_sketch(100), eps=0.01)
        assert not torch.allclose(expand_op(h), derived)
        target.eval()(torch.randn(2, 196, C))  # another resolution: derived sketch, the stored one untouched
    assert torch.equal(target.attn.expand.sketch, custom)
    with torch.no_grad():
        torch.testing.assert_close(expand_op(h), expand(h, custom, eps=0.01), rtol=0, atol=0)
    # Training at the stored size keeps using it until the epoch changes.
    _train_step(target, 100)
    assert torch.equal(target.attn.expand.sketch, custom)
    target.set_epoch(1)
    _train_step(target, 100)
    assert not torch.equal(target.attn.expand.sketch, custom)


def test_loading_a_sketch_of_the_wrong_width_fails_naming_the_key():
    state = _block().state_dict()
    state["attn.compress.sketch"] = torch.randn(196, RANK + 1)
    with pytest.raises(RuntimeError, match="attn.compress.sketch"):
        _block().load_state_dict(state)


def test_meta_model_loads_a_checkpoint_with_assign():
    source = _block()
    _train_step(source, 196)
    target = PACEBlock(C, K, attn_layer=partial(PACEAttention, rank=RANK), device="meta")
    target.load_state_dict(source.state_dict(), assign=True)
    x = torch.randn(2, 196, C)
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(x), source.eval()(x), rtol=0, atol=0)


def test_step_schedule_redraws_every_training_forward_deterministically():
    blocks = [_block(sketch_schedule="step"), _block(sketch_schedule="step")]
    histories = [[], []]
    for block, history in zip(blocks, histories):
        for _ in range(3):
            _train_step(block, 64)
            history.append(_sketches(block)[1])
        with torch.no_grad():
            block.eval()(torch.randn(1, 64, C))  # evaluation neither advances nor redraws
        history.append(_sketches(block)[1])
    for a, b in zip(*histories):
        assert torch.equal(a, b)
    first = histories[0]
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    assert torch.equal(first[2], first[3])
    blocks[0].set_epoch(0)
    _train_step(blocks[0], 64)
    assert torch.equal(_sketches(blocks[0])[1], first[0])


def test_fixed_schedule_ignores_epochs():
    block = _block(sketch_schedule="fixed")
    _train_step(block, 64)
    before = _sketches(block)
    block.set_epoch(5)
    _train_step(block, 64)
    assert all(torch.equal(a, b) for a, b in zip(before, _sketches(block)))
    _train_step(block, 81)
    assert _sketches(block)[0].shape[0] == 81


@pytest.mark.parametrize("schedule", ["epoch", "reference"])
def test_compiled_block_follows_the_schedule_like_eager(schedule):
    eager, compiled_block = _block(sketch_schedule=schedule), _block(sketch_schedule=schedule)
    compiled_block.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_block, backend="eager")
    x = torch.randn(2, 64, C)
    for epoch in range(2):
        eager.set_epoch(epoch)
        compiled_block.set_epoch(epoch)
        for _ in range(2):  # under "reference", the second forward of epoch 1 draws a new sketch
            eager.train()
            compiled_block.train()
            torch.testing.assert_close(compiled(x), eager(x), rtol=0, atol=0)
            assert all(torch.equal(a, b) for a, b in zip(_sketches(eager), _sketches(compiled_block)))
        eager.eval()
        compiled_block.eval()
        with torch.no_grad():
            torch.testing.assert_close(compiled(x[:, :49]), eager(x[:, :49]), rtol=0, atol=0)
    assert compiled_block.attn.expand.step == eager.attn.expand.step == (2 if schedule == "reference" else 0)


def test_sync_sketches_lets_timm_model_ema_average_a_model_whose_sketch_changed_size():
    from timm.utils import ModelEmaV3

    model = torch.nn.Sequential(_block(), _block(layer_idx=1))
    ema = ModelEmaV3(model, decay=0.9)
    for n in (49, 64):
        model.train()
        model(torch.randn(2, n, C)).sum().backward()
        sync_sketches(model, ema.module)
        ema.update(model, step=10)
    for src, dst in zip(model, ema.module):
        assert all(torch.equal(a, b) for a, b in zip(_sketches(src), _sketches(dst)))
    ema.module.eval()
    # The averaged copy evaluates with the model's last sketch.
    assert torch.equal(ema.module[1].attn.compress.current_sketch(64), model[1].attn.compress.sketch)


# The "reference" schedule: the authors' redraws (PACE_SPEC §3), seeded.


def _expected(block, op, n, *, epoch, step, tag=""):
    # The seed formula written out here: (seed, epoch, step, layer, n, operator name), then a CPU Gaussian draw.
    module = getattr(block.attn, op)
    name = f"{op}/{tag}" if tag else op
    seed = derive_sketch_seed(
        module.sketch_seed, epoch=epoch, step=step, layer_idx=module.layer_idx, num_tokens=n, operator=name
    )
    return gaussian_sketch(n, module.sketch_width, seed=seed)


def test_reference_schedule_keeps_one_sketch_in_epoch_zero_then_redraws_every_forward():
    blocks = [_block(sketch_schedule="reference", layer_idx=3), _block(sketch_schedule="reference", layer_idx=3)]
    histories = [[], []]
    for block, history in zip(blocks, histories):  # two "ranks", no communication
        block.set_epoch(0)
        for _ in range(3):
            _train_step(block, 64)
            history.append(_sketches(block))
        block.set_epoch(1)
        for _ in range(3):
            _train_step(block, 64)
            history.append(_sketches(block))
    for a, b in zip(*histories):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    h = histories[0]
    for k in range(3):
        assert torch.equal(h[k][0], _expected(blocks[0], "expand", 64, epoch=0, step=0))
        assert torch.equal(h[3 + k][0], _expected(blocks[0], "expand", 64, epoch=1, step=k))
        assert torch.equal(h[3 + k][1], _expected(blocks[0], "compress", 64, epoch=1, step=k))
    assert not torch.equal(h[3][1], h[4][1]) and not torch.equal(h[4][1], h[5][1])
    assert blocks[0].attn.expand.step == 3


def test_reference_schedule_evaluates_with_one_fixed_derived_sketch_unless_fresh_is_asked():
    block = _block(sketch_schedule="reference")
    x = torch.randn(2, 64, C)
    block.set_epoch(1)
    _train_step(block, 64)
    eval_sketch = _expected(block, "compress", 64, epoch=0, step=0, tag="eval")
    block.eval()
    with torch.no_grad():
        y = block(x)
        assert torch.equal(block.attn.compress.current_sketch(64), eval_sketch)
        assert not torch.equal(block.attn.compress.sketch, eval_sketch)  # not the last training draw
        block.set_epoch(7)  # nor a function of the training state
        torch.testing.assert_close(block(x), y, rtol=0, atol=0)
    assert (block.attn.compress.step, block.attn.compress.eval_step) == (0, 0)
    # The authors' validation: a fresh (here seeded) sketch per evaluation forward, from epoch 1 on.
    set_eval_sketch(block, "fresh")
    with torch.no_grad():
        fresh = [block.attn.compress.current_sketch(64) for _ in range(2)]
    assert torch.equal(fresh[1], _expected(block, "compress", 64, epoch=7, step=1, tag="eval"))
    assert not torch.equal(fresh[0], fresh[1])
    assert (block.attn.compress.step, block.attn.compress.eval_step) == (0, 2)
    with pytest.raises(ValueError, match="eval sketch must be one of"):
        set_eval_sketch(block, "random")


def test_reseeding_changes_the_evaluation_sketch_and_drops_stored_ones():
    for schedule in ("epoch", "reference"):
        block = _block(sketch_schedule=schedule)
        _train_step(block, 64)
        block.eval()
        with torch.no_grad():
            before = block.attn.expand.current_sketch(64)
            reseed_sketches(block, 11)
            after = block.attn.expand.current_sketch(64)
        assert block.attn.expand.sketch.shape[0] == 0 and not torch.equal(before, after)
        tag = "eval" if schedule == "reference" else ""
        assert torch.equal(after, _expected(block, "expand", 64, epoch=0, step=0, tag=tag))


@pytest.mark.parametrize("schedule", ["step", "reference"])
def test_a_run_resumed_from_a_state_dict_draws_the_uninterrupted_runs_sketches(schedule):
    uninterrupted = _block(sketch_schedule=schedule)
    uninterrupted.set_epoch(2)
    for _ in range(3):
        _train_step(uninterrupted, 49)
    saved = {k: v.clone() for k, v in uninterrupted.state_dict().items()}
    assert saved["attn.expand._extra_state"].tolist() == [2, 3, 0]
    resumed = _block(sketch_schedule=schedule)
    resumed.load_state_dict(saved)  # no set_epoch: a mid-epoch resume
    for _ in range(2):
        _train_step(uninterrupted, 49)
        _train_step(resumed, 49)
        assert all(torch.equal(a, b) for a, b in zip(_sketches(uninterrupted), _sketches(resumed)))
    # A state dict written before the counters were saved still loads strictly, with the counters at zero.
    old = {k: v for k, v in saved.items() if not k.endswith("_extra_state")}
    fresh = _block(sketch_schedule=schedule)
    fresh.load_state_dict(old)
    assert (fresh.attn.expand.epoch, fresh.attn.expand.step) == (0, 0)


def test_model_ema_copy_follows_the_reference_schedule():
    from timm.utils import ModelEmaV3

    model = torch.nn.Sequential(_block(sketch_schedule="reference"), _block(sketch_schedule="reference", layer_idx=1))
    ema = ModelEmaV3(model, decay=0.9)
    for epoch in (0, 1):
        for blk in model:
            blk.set_epoch(epoch)
        for _ in range(2):
            model.train()
            model(torch.randn(2, 64, C)).sum().backward()
            sync_sketches(model, ema.module)
            ema.update(model, step=10)
    for src, dst in zip(model, ema.module):
        assert all(torch.equal(a, b) for a, b in zip(_sketches(src), _sketches(dst)))
        assert (dst.attn.compress.epoch, dst.attn.compress.step) == (1, 2)
    model.eval()
    ema.module.eval()
    # Both evaluate with the same fixed evaluation sketch.
    assert torch.equal(ema.module[1].attn.compress.current_sketch(64), model[1].attn.compress.current_sketch(64))


def test_reference_schedule_refuses_gradient_checkpointing():
    import timm

    import pace  # noqa: F401  (registers the models)

    model = timm.create_model("pace_vit_test", sketch_schedule="reference")
    with pytest.raises(ValueError, match="gradient checkpointing cannot be combined with sketch_schedule='reference'"):
        model.set_grad_checkpointing(True)
