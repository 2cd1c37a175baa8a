"""`trainer.compile`, `trainer.compile_scope` and `trainer.compile_mode`: what the training loop runs through."""

import pytest
import timm
import torch
from test_configs import compose_train

import pace  # noqa: F401  (registers the models)
from pace.distributed import DistEnv
from pace.models import compile_blocks
from pace.train.assemble import _wrap_for_training
from pace.train.config import TrainerConfig, validate


def _compiled(module: torch.nn.Module) -> bool:
    # nn.Module.compile stores the compiled call here; an uncompiled module has None.
    return getattr(module, "_compiled_call_impl", None) is not None


@pytest.mark.parametrize("name", ["pace_vit_test", "test_vit"])
def test_block_scope_compiles_each_block_in_place_and_keeps_the_model(name):
    model = timm.create_model(name, num_classes=3)
    keys = list(model.state_dict())
    trainer = TrainerConfig(compile=True, compile_scope="blocks", compile_mode="reduce-overhead")
    run = _wrap_for_training(model, DistEnv(), torch.device("cpu"), trainer)
    assert run is model  # no OptimizedModule around it: checkpoints and EMA see the same module tree
    assert list(model.state_dict()) == keys
    assert model.blocks and all(_compiled(blk) for blk in model.blocks)
    assert not _compiled(model) and not _compiled(model.head)


def test_model_scope_wraps_the_whole_model_and_off_leaves_it_alone():
    model = timm.create_model("pace_vit_test", num_classes=3)
    run = _wrap_for_training(model, DistEnv(), torch.device("cpu"), TrainerConfig(compile=True))
    assert isinstance(run, torch._dynamo.eval_frame.OptimizedModule) and run._orig_mod is model
    assert not any(_compiled(blk) for blk in model.blocks)
    plain = _wrap_for_training(model, DistEnv(), torch.device("cpu"), TrainerConfig(compile_scope="blocks"))
    assert plain is model and not any(_compiled(blk) for blk in model.blocks)


def test_a_model_without_blocks_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match="compile_scope=model"):
        compile_blocks(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "override, key",
    [("trainer.compile_scope=layers", "trainer.compile_scope"), ("trainer.compile_mode=fast", "trainer.compile_mode")],
)
def test_bad_compile_settings_are_refused_before_any_work(override, key):
    with pytest.raises(ValueError) as err:
        validate(compose_train(override))
    assert key in str(err.value)


def test_the_compile_settings_compose():
    cfg = validate(
        compose_train("trainer.compile=true", "trainer.compile_scope=blocks", "trainer.compile_mode=reduce-overhead")
    )
    assert (cfg.trainer.compile, cfg.trainer.compile_scope, cfg.trainer.compile_mode) == (
        True,
        "blocks",
        "reduce-overhead",
    )
