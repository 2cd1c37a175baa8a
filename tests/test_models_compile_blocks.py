"""Regional compilation of PACE-ViT (compile_blocks) and sketches redrawn in place across epochs."""

import pytest
import timm
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

import pace  # noqa: F401  (registers the models)
from pace.layers import SketchedModule


def _model(depth: int = 4, **kwargs):
    return timm.create_model("pace_vit_test", img_size=32, num_classes=5, depth=depth, **kwargs)


def _sketches(model):
    return [m.sketch for m in model.modules() if isinstance(m, SketchedModule)]


def test_set_epoch_redraws_sketches_in_the_same_buffers():
    model = _model().train()
    model(torch.randn(2, 3, 32, 32))
    before = [(s.data_ptr(), s.clone()) for s in _sketches(model)]
    model.set_epoch(1)
    after = _sketches(model)
    assert [s.data_ptr() for s in after] == [ptr for ptr, _ in before]  # same addresses (CUDA graph inputs)
    assert all(not torch.equal(s, old) for s, (_, old) in zip(after, before))  # new draws
    fresh = _model().train()
    fresh.load_state_dict(model.state_dict())
    fresh.set_epoch(1)
    assert all(torch.equal(a, b) for a, b in zip(_sketches(fresh), after))  # the epoch's sketch, not a stale one


@pytest.mark.parametrize("depth", [4, 12])
def test_compiled_blocks_share_frames_across_blocks_and_epochs_and_match_eager(depth):
    # Depth 12 (PACE-ViT-S's) is past Dynamo's recompile limit of 8: a frame per block would leave blocks eager.
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = _model(depth).train(), _model(depth).train()
    compiled.load_state_dict(eager.state_dict())
    counter = CompileCounter()
    compiled.compile_blocks(backend=counter)
    assert set(compiled.state_dict()) == set(eager.state_dict())  # in place: no _orig_mod prefixes
    images = torch.randn(2, 3, 32, 32)
    settled = None
    for epoch in range(3):
        for model in (eager, compiled):
            model.set_epoch(epoch)
        for _ in range(2):
            outs = []
            for model in (eager, compiled):
                model.zero_grad()
                out = model(images)
                out.square().sum().backward()
                outs.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
            torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
            for a, b in zip(outs[0][1], outs[1][1]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        if epoch == 0:
            settled = counter.frame_count
    # Later epochs compile nothing new (the sketches are redrawn in place outside the graphs). compile_blocks drew
    # the sketches beforehand, so from the first step all PACE blocks share one stored-sketch frame, whatever the
    # depth, and the class-attention blocks two: all tokens (the first), the class token alone (the last, which
    # runs compiled too); nothing breaks a graph.
    assert counter.frame_count == settled
    assert settled == 3
    assert not counters["graph_break"], dict(counters["graph_break"])


def _frames_of_reference_training_with_evaluation(depth: int) -> list[int]:
    # Frames compiled by the end of each epoch of the authors' schedule (fresh training sketches from epoch 1,
    # a fixed evaluation sketch), with an evaluation after each epoch; outputs checked against the eager model.
    torch._dynamo.reset()
    eager, compiled = _model(depth, sketch_schedule="reference"), _model(depth, sketch_schedule="reference")
    compiled.load_state_dict(eager.state_dict())
    counter = CompileCounter()
    compiled.compile_blocks(backend=counter)
    images = torch.randn(2, 3, 32, 32)
    frames = []
    for epoch in range(3):
        for model in (eager, compiled):
            model.train().set_epoch(epoch)
        for _ in range(2):
            outs = [model(images) for model in (eager, compiled)]
            torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
            for out in outs:
                out.square().sum().backward()
        with torch.no_grad():
            outs = [model.eval()(images) for model in (eager, compiled)]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
        frames.append(counter.frame_count)
    return frames


def test_reference_schedule_evaluation_compiles_the_same_frames_at_any_depth():
    # The evaluation sketch is derived eagerly (set_epoch, compile_blocks), so no evaluation graph specialises on
    # the layer: depth 12 compiles what depth 4 does, below Dynamo's recompile limit (8) per code object.
    shallow = _frames_of_reference_training_with_evaluation(4)
    deep = _frames_of_reference_training_with_evaluation(12)
    assert deep == shallow
    assert deep[-1] == deep[-2]  # nothing new once epoch 1's fresh training sketches have compiled
