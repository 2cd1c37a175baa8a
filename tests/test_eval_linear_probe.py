"""Linear probing: `model.linear_probe` re-initialises the classifier and freezes everything else, so SGD steps in
training mode move the head alone (BatchNorm statistics included), from a checkpoint's weights."""

import pytest
import timm
import torch

import pace  # noqa: F401  (registers the models)
from pace.train.builders import build_model, build_optimizer
from pace.train.config import ModelConfig, OptimConfig


def trained_checkpoint(path):
    """A pace_vit_test checkpoint after a training-mode forward at epoch 2, so it holds that epoch's sketches."""
    torch.manual_seed(0)
    model = timm.create_model("pace_vit_test")
    model.set_epoch(2)
    model.train()(torch.randn(2, 3, 64, 64))
    state = model.state_dict()
    torch.save({"model": state, "model_ema": state, "model_name": "pace_vit_test", "model_args": {}}, path)
    return path


def _train_steps(model, steps=3):
    optimizer = build_optimizer(model, OptimConfig(opt="sgd", lr=0.5, weight_decay=0.0), global_batch=8)
    model.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        images = torch.randn(8, 3, 64, 64, generator=gen)
        loss = torch.nn.functional.cross_entropy(model(images), torch.randint(0, 5, (8,), generator=gen))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("name", ["pace_vit_test", "resnet10t"])
def test_only_the_new_head_trains(name, tmp_path):
    pretrained = None
    if name == "pace_vit_test":
        pretrained = str(trained_checkpoint(tmp_path / "ckpt.pt"))
    cfg = ModelConfig(name=name, num_classes=5, drop_path_rate=0.0, pretrained=pretrained, linear_probe=True)
    model = build_model(cfg)
    head = model.get_classifier()
    assert head.out_features == 5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if pretrained:
        saved = torch.load(pretrained, weights_only=True)["model_ema"]
        # The backbone is the checkpoint's; the head is new (the checkpoint's has 1000 classes).
        # (Its BatchNorm became timm's FrozenBatchNorm2d, which keeps no `num_batches_tracked`.)
        kept = {k: v for k, v in saved.items() if not k.startswith("head.") and "num_batches_tracked" not in k}
        assert all(torch.equal(before[k], v) for k, v in kept.items())
    if hasattr(model, "set_epoch"):
        model.set_epoch(5)  # as the Trainer does each epoch: a probe's backbone keeps its sketches
    optimizer = _train_steps(model)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in head.parameters()}
    after = model.state_dict()
    head_keys = {k for k in after if k.startswith(("head.", "fc."))}
    # `_extra_state` holds the sketch schedule's counters (epoch, forwards), not weights; the sketches themselves
    # are buffers and are compared below with everything else.
    counters = {k for k in after if k.endswith("._extra_state")}
    changed = {k for k in after if k not in counters and not torch.equal(before[k], after[k])}
    assert changed == head_keys  # BatchNorm running statistics (resnet10t) and sketches included: nothing else moved


def test_stochastic_depth_is_refused_for_a_probe():
    with pytest.raises(ValueError, match="model.drop_path_rate=0.1 is invalid: expected 0 for a linear probe"):
        ModelConfig(name="pace_vit_test", drop_path_rate=0.1, linear_probe=True)


def test_without_the_option_everything_trains():
    model = build_model(ModelConfig(name="pace_vit_test", num_classes=5, drop_path_rate=0.0))
    assert all(p.requires_grad for p in model.parameters())
    assert isinstance(timm.create_model("pace_vit_test").get_classifier(), torch.nn.Linear)
