"""The sketch schedule: deterministic draws, redraws, checkpoints holding and restoring Ω."""

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from pace.layers import PACEBlock, derive_sketch_seed, expand, gaussian_sketch

C, K, RANK = 32, 4, 4


def _block(**kwargs):
    return PACEBlock(C, K, rank=RANK, **kwargs)


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
    target = PACEBlock(C, K, rank=RANK, device="meta")
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
