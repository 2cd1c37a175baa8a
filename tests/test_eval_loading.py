"""`load_model` from every supported source gives the model whose weights were saved (same logits), picks EMA or
raw weights as asked, and names what is wrong with a bad checkpoint. The hub is read from a local cache only."""

import argparse
import logging

import huggingface_hub
import pytest
import timm
import torch
from test_checkpoint_filter import reference_state_dict
from timm.models import save_for_hf

import pace  # noqa: F401  (registers the models)
from pace.eval.loading import load_model, sha256_file
from pace.eval.transform import eval_data_config
from pace.models import checkpoint_filter_fn

NAME = "pace_vit_test"


@pytest.fixture(scope="module")
def image():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def logits_of(model, image):
    with torch.no_grad():
        return model.eval()(image)


def two_models(num_classes=10):
    torch.manual_seed(1)
    raw = timm.create_model(NAME, num_classes=num_classes)
    torch.manual_seed(2)
    ema = timm.create_model(NAME, num_classes=num_classes)
    return raw, ema


def test_timm_name(image):
    loaded = load_model("resnet10t", model_kwargs={"num_classes": 7})
    assert (loaded.name, loaded.source, loaded.weights) == ("resnet10t", "timm", "random")
    assert not loaded.model.training
    assert loaded.model.get_classifier().out_features == 7


def test_our_training_checkpoint_raw_and_ema(tmp_path, image):
    raw, ema = two_models()
    # EMA weights as timm's ModelEmaV3 saves them (under `module.`), raw weights as DDP would (`module.` too).
    checkpoint = {
        "model": {f"module.{k}": v for k, v in raw.state_dict().items()},
        "model_ema": {f"module.{k}": v for k, v in ema.state_dict().items()},
        "model_name": NAME,
        "model_args": {"num_classes": 10},
        "config": {"optim": {"lr": 0.001}},
        "epoch": 3,
    }
    path = tmp_path / "step_00000100.pt"
    torch.save(checkpoint, path)

    # By default the raw weights (best.pt is chosen by their metric); EMA one option away.
    auto = load_model(checkpoint=path)
    assert (auto.name, auto.source, auto.weights, auto.info["epoch"]) == (NAME, "checkpoint", "model", 3)
    assert torch.equal(logits_of(auto.model, image), logits_of(raw, image))
    averaged = load_model(NAME, checkpoint=path, weights="ema")
    assert averaged.weights == "model_ema"
    assert torch.equal(logits_of(averaged.model, image), logits_of(ema, image))
    assert auto.files == [path] and len(sha256_file(path)) == 64

    with pytest.raises(ValueError, match="holds a 'pace_vit_test' model, but model name 'resnet10t'"):
        load_model("resnet10t", checkpoint=path)
    del checkpoint["model"]
    torch.save(checkpoint, path)
    assert load_model(checkpoint=path).weights == "model_ema"  # no raw weights: auto takes the EMA ones
    with pytest.raises(ValueError, match="raw weights asked for, but the checkpoint has only model_ema"):
        load_model(checkpoint=path, weights="raw")
    checkpoint["model"] = checkpoint.pop("model_ema")
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="EMA weights asked for, but the checkpoint has none"):
        load_model(checkpoint=path, weights="ema")


def test_release_folder_and_file(tmp_path, image):
    model, _ = two_models()
    save_for_hf(model, tmp_path / "release", model_args={"num_classes": 10}, safe_serialization=True)
    for target in (tmp_path / "release", tmp_path / "release" / "model.safetensors"):
        loaded = load_model(checkpoint=target)
        assert (loaded.name, loaded.source) == (NAME, "release")
        assert loaded.files == [tmp_path / "release" / "model.safetensors"]
        assert torch.equal(logits_of(loaded.model, image), logits_of(model, image))


def test_authors_format_goes_through_the_models_filter(tmp_path, image, caplog):
    raw_sd, ema_sd = reference_state_dict(seed=0), reference_state_dict(seed=1)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": raw_sd, "model_ema": ema_sd, "epoch": 399, "args": argparse.Namespace(lr=5e-4)}, path)

    def expected(state_dict):
        model = timm.create_model(NAME)
        model.load_state_dict(checkpoint_filter_fn(state_dict, model))
        return logits_of(model, image)

    # The authors evaluate, select and fine-tune from checkpoint['model']: that is the default, and the log says so.
    with caplog.at_level(logging.INFO, logger="pace.eval.loading"):
        loaded = load_model(NAME, checkpoint=path)
    assert (loaded.source, loaded.weights) == ("state_dict", "model")
    assert torch.equal(logits_of(loaded.model, image), expected(raw_sd))
    assert "loaded the raw weights (checkpoint['model']" in caplog.text
    assert "state_dict" not in loaded.model.pretrained_cfg
    assert torch.equal(logits_of(load_model(NAME, checkpoint=path, weights="raw").model, image), expected(raw_sd))
    ema = load_model(NAME, checkpoint=path, weights="ema")
    assert ema.weights == "model_ema"
    assert torch.equal(logits_of(ema.model, image), expected(ema_sd))
    # The model's own filter, given the whole file, takes `model` as well.
    model = timm.create_model(NAME)
    model.load_state_dict(checkpoint_filter_fn(torch.load(path, weights_only=False), model))
    assert torch.equal(logits_of(model, image), expected(raw_sd))
    with pytest.raises(ValueError, match="does not name its architecture"):
        load_model(checkpoint=path)


def test_plain_state_dict_for_any_timm_model(tmp_path, image):
    model = timm.create_model("test_vit", num_classes=5, img_size=64)
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    loaded = load_model(
        "test_vit", checkpoint=tmp_path / "weights.pth", model_kwargs={"num_classes": 5, "img_size": 64}
    )
    assert loaded.weights == "state_dict"
    assert torch.equal(logits_of(loaded.model, image), logits_of(model, image))
    # A head of another size is an error, never a silently re-initialised classifier.
    with pytest.raises(RuntimeError, match="head.weight"):
        load_model("test_vit", checkpoint=tmp_path / "weights.pth", model_kwargs={"img_size": 64})


def test_hf_hub_from_a_local_cache_only(tmp_path, image, monkeypatch):
    model, _ = two_models()
    repo = tmp_path / "hub" / "models--pace-test--tiny"
    revision = "0123456789abcdef0123456789abcdef01234567"
    save_for_hf(model, repo / "snapshots" / revision, model_args={"num_classes": 10}, safe_serialization=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    loaded = load_model(checkpoint="hf-hub:pace-test/tiny")
    assert (loaded.name, loaded.source, loaded.info["hub_id"]) == (NAME, "hf-hub", "pace-test/tiny")
    assert loaded.files == [repo / "snapshots" / revision / "model.safetensors"]
    assert torch.equal(logits_of(loaded.model, image), logits_of(model, image))


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        load_model(checkpoint=tmp_path / "missing.pt")
    torch.save({"optimizer": {"lr": 1.0}, "epoch": 1}, tmp_path / "no_weights.pt")
    with pytest.raises(ValueError, match="no_weights.pt: no weights found"):
        load_model(NAME, checkpoint=tmp_path / "no_weights.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt: cannot be read as a weights-only torch checkpoint"):
        load_model(NAME, checkpoint=tmp_path / "garbage.pt")
    with pytest.raises(ValueError, match="weights must be one of"):
        load_model(NAME, weights="best")


def test_our_checkpoint_restores_its_runs_eval_transform(tmp_path):
    model = timm.create_model(NAME, num_classes=10)
    run = {"data": {"img_size": 40}, "aug": {"crop_pct": 0.9, "interpolation": "bilinear"}}
    path = tmp_path / "step_00000001.pt"
    checkpoint = {"model": model.state_dict(), "model_name": NAME, "model_args": {"num_classes": 10}, "config": run}
    torch.save(checkpoint, path)
    config = eval_data_config(load_model(checkpoint=path).model)
    assert (config["input_size"], config["crop_pct"], config["interpolation"]) == ((3, 40, 40), 0.9, "bilinear")
    # A resolution asked for at load time wins over the run's; a checkpoint without the sections keeps timm's.
    config = eval_data_config(load_model(checkpoint=path, model_kwargs={"img_size": 48}).model)
    assert (config["input_size"], config["crop_pct"]) == ((3, 48, 48), 0.9)
    torch.save({**checkpoint, "config": {"optim": {"lr": 0.1}}}, path)
    default = timm.create_model(NAME).pretrained_cfg
    config = eval_data_config(load_model(checkpoint=path).model)
    assert (config["input_size"], config["crop_pct"]) == (tuple(default["input_size"]), default["crop_pct"])


def test_sketch_seed_evaluates_with_the_sketches_derived_from_it(tmp_path, image):
    from pace.layers import derive_sketch_seed, gaussian_sketch

    raw, _ = two_models()
    raw.train()(image)  # stores the training sketches in the checkpoint
    path = tmp_path / "step_00000001.pt"
    torch.save({"model": raw.state_dict(), "model_name": NAME, "model_args": {"num_classes": 10}}, path)
    own = load_model(checkpoint=path)
    assert torch.equal(logits_of(own.model, image), logits_of(raw, image))
    seeded = load_model(checkpoint=path, sketch_seed=4)
    assert seeded.info["sketch_seed"] == 4
    op = seeded.model.blocks[1].attn.compress
    n = raw.blocks[1].attn.compress.sketch.shape[0]
    key = derive_sketch_seed(4, epoch=0, step=0, layer_idx=1, num_tokens=n, operator="compress")
    assert torch.equal(op.current_sketch(n), gaussian_sketch(n, op.sketch_width, seed=key))
    assert not torch.equal(logits_of(seeded.model, image), logits_of(raw, image))
