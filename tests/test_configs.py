"""Every config composes, validates and instantiates; bad keys and values fail early, naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError
from train_helpers import ROOT, train_env

import pace  # noqa: F401  (registers the PACE-ViT variants)
from pace.train.builders import build_model, build_optimizer
from pace.train.config import TrainConfig, register_configs, validate

CONFIG_DIR = ROOT / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
GROUPS = {g: sorted(p.stem for p in (CONFIG_DIR / g).glob("*.yaml")) for g in ("model", "data", "aug", "optim")}


def compose_train(*overrides: str):
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        # run_dir comes from Hydra's runtime, which only exists inside a real run.
        return compose("train", overrides=[*overrides, "run_dir=unused"])


def test_config_dir_is_shipped_inside_the_package():
    from pace.train import main

    assert (main.CONFIG_DIR / "train.yaml").is_file()
    assert main.CONFIG_DIR.resolve() == CONFIG_DIR.resolve()


def test_experiment_list_is_complete():
    expected = {"pace_vit_tiny_in1k", "pace_vit_small_in1k", "pace_vit_medium_in1k", "finetune", "quickstart"}
    assert expected <= set(EXPERIMENTS)
    assert "cifar10" in EXPERIMENTS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment):
    overrides = [f"experiment={experiment}"]
    if experiment in ("finetune", "linear_probe", "linear_probe_quickstart"):
        # loading weights is tested in test_train_finetune.py and test_eval_linear_probe.py
        overrides.append("model.pretrained=null")
    cfg = validate(compose_train(*overrides))
    assert isinstance(cfg, TrainConfig)
    assert cfg.name == experiment
    with torch.device("meta"):
        model = build_model(cfg.model)
    assert model.num_classes == cfg.data.num_classes
    optimizer = build_optimizer(model, cfg.optim, global_batch=cfg.data.batch_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(p.numel() for p in trainable)
    # A linear probe trains the classifier alone; every other experiment trains everything.
    expected = list(model.get_classifier().parameters()) if cfg.model.linear_probe else list(model.parameters())
    assert sum(p.numel() for p in trainable) == sum(p.numel() for p in expected)


def test_experiment_headers_state_command_hardware_and_expectation():
    for experiment in EXPERIMENTS:
        header = (CONFIG_DIR / "experiment" / f"{experiment}.yaml").read_text().split("defaults:")[0]
        for field in ("Command", "Hardware", "Expected"):
            assert f"# {field}" in header, f"{experiment}.yaml header lacks '{field}'"


def test_in1k_experiments_hold_the_reference_recipe():
    cfg = validate(compose_train("experiment=pace_vit_small_in1k"))
    assert cfg.model.name == "pace_vit_small_patch16_224"
    optim = cfg.optim
    assert (optim.opt, optim.base_lr, optim.lr_base_size, optim.weight_decay) == ("adamw", 5e-4, 512, 0.05)
    assert (cfg.sched.sched, cfg.sched.epochs, cfg.sched.warmup_epochs) == ("cosine", 400, 5)
    assert (cfg.sched.warmup_lr, cfg.sched.min_lr) == (1e-6, 1e-5)
    assert (cfg.data.batch_size, cfg.model.drop_path_rate, cfg.trainer.ema_decay) == (64, 0.1, 0.99996)
    assert (cfg.aug.auto_augment, cfg.aug.mixup, cfg.aug.cutmix) == ("rand-m9-mstd0.5-inc1", 0.8, 1.0)
    assert (cfg.aug.label_smoothing, cfg.aug.reprob, cfg.aug.color_jitter) == (0.1, 0.25, 0.4)
    assert cfg.optim.clip_grad is None and cfg.aug.interpolation == "bicubic"
    for size in ("tiny", "small", "medium"):  # DeiT's repeat count; the other recipe keys are shared
        assert validate(compose_train(f"experiment=pace_vit_{size}_in1k")).aug.repeated_aug == 3


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, options in GROUPS.items() for o in options])
def test_every_group_option_composes(group, option):
    validate(compose_train(f"{group}={option}", "model.pretrained=null"))


@pytest.mark.parametrize(
    ("override", "key"),
    [("optim.lrr=0.1", "lrr"), ("+trainer.epochz=3", "epochz"), ("data.batchsize=3", "batchsize")],
)
def test_unknown_key_fails_naming_it(override, key):
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValueError)) as err:
        validate(compose_train("debug=cpu", override))
    assert key in str(err.value)


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose_train("debug=cpu", "data.batch_size=big")
    message = str(err.value) + str(err.value.__cause__)
    assert "batch_size" in message and "big" in message


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.precision=fp8", "trainer.precision"),
        ("optim.layer_decay=1.5", "optim.layer_decay"),
        ("trainer.on_nonfinite=ignore", "trainer.on_nonfinite"),
        ("sched.warmup_epochs=9", "sched.warmup_epochs"),
        ("model.num_classes=7", "model.num_classes"),
        ("data.batch_size=3", "data.batch_size"),
        ("eval.val.every_n_epochs=0", "eval.val"),
        ("trainer.telemetry_images=0", "trainer.telemetry_images"),
        ("aug.repeated_aug=0", "aug.repeated_aug"),
        ("aug.repeated_aug=3", "aug.repeated_aug"),  # debug=cpu reads synthetic tensors: nothing to repeat
        ("name=''", "name=''"),  # the run dir would be runs/debug/, every debug run's parent
        ("name=x/..", "name='x/..'"),
    ],
)
def test_bad_value_fails_naming_the_key(override, key):
    cfg = compose_train("debug=cpu", "aug=deit", override)
    with pytest.raises((ValueError, ValidationError)) as err:
        validate(cfg)
    assert key in str(err.value)


def test_bad_value_stops_the_cli_before_any_work(tmp_path: Path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "pace.train.main", f"hydra.run.dir={run_dir}", "debug=cpu", "trainer.precision=fp8"]
    out = subprocess.run(cmd, env=train_env(), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode != 0
    assert "trainer.precision='fp8'" in out.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()


def test_cfg_job_prints_the_resolved_config(tmp_path: Path):
    cmd = [sys.executable, "scripts/train.py", "experiment=quickstart", "--cfg", "job", "--resolve"]
    out = subprocess.run(cmd, env=train_env(), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "name: quickstart" in out.stdout
    assert "num_classes: 10" in out.stdout and "${" not in out.stdout


def test_the_command_line_surface_is_frozen():
    # New knobs belong in a group's schema, not at the top level; a new group or top-level key must be deliberate
    # (update this test and docs/training.md together).
    cfg = compose_train("debug=cpu")
    top = {"name", "seed", "run_dir", "model", "data", "aug", "optim", "sched", "trainer", "distill", "logger", "eval"}
    assert set(cfg) == top
    groups = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()} - {"local"}
    assert groups == {
        "model",
        "data",
        "aug",
        "optim",
        "sched",
        "trainer",
        "distill",
        "logger",
        "eval",
        "hydra",
        "experiment",
        "debug",
    }


@pytest.mark.slow
def test_a_built_wheel_ships_the_config_tree(tmp_path: Path):
    # `pip install .` copies the linked configs/ into the package; an installed copy must compose on its own.
    env = train_env()
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."]
    subprocess.run(build, cwd=ROOT, env=env, check=True, timeout=300)
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target)]
    subprocess.run([*install, *map(str, tmp_path.glob("*.whl"))], env=env, check=True, timeout=300)
    env["PYTHONPATH"] = str(target)
    cmd = [sys.executable, "-m", "pace.train.main", "experiment=quickstart", "--cfg", "job"]
    run = {"cwd": tmp_path, "env": env, "capture_output": True, "text": True, "timeout": 60}
    out = subprocess.run(cmd, **run)
    assert out.returncode == 0, out.stderr
    assert "name: quickstart" in out.stdout
    assert not (target / "pace" / "configs").is_symlink()
    # The console script is the launcher outside the package (pace_cli), which the wheel ships beside it.
    script = target / "bin" / "pace-train"
    assert "from pace_cli import train" in script.read_text()
    out = subprocess.run([sys.executable, str(script), "experiment=quickstart", "--cfg", "job"], **run)
    assert out.returncode == 0 and "name: quickstart" in out.stdout, out.stderr


def test_submitit_launcher_config_composes():
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (8, 8, 1)
    assert launcher.signal_delay_s > 0 and launcher.max_num_timeout > 0
    # Hydra builds the launcher from this node; the run-time interpolations are left out here.
    params = {k: v for k, v in OmegaConf.to_container(launcher).items() if k not in ("submitit_folder", "name")}
    built = instantiate(params)
    assert type(built).__name__ == "SlurmLauncher" and built.params["tasks_per_node"] == 8


def test_model_kwargs_stay_open_for_timm_arguments():
    cfg = validate(compose_train("debug=cpu", "+model.kwargs.compress_form=diag"))
    assert cfg.model.kwargs == {"compress_form": "diag"}
    with torch.device("meta"):
        assert build_model(cfg.model).compress_form == "diag"


def _leaf_keys(node, prefix: str = ""):
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaf_keys(value, f"{path}.")
        else:
            yield path


@pytest.mark.parametrize(("primary", "schema"), [("train", "pace.train.config"), ("eval", "pace.eval.config")])
def test_yaml_defaults_agree_with_the_schema_defaults(primary, schema, monkeypatch):
    """The schema dataclasses hold every default; the option each group selects by default (and the primary
    file itself) may not set a value that differs from them. Evaluator entries are declarations, not defaults."""
    import importlib

    from hydra import compose, initialize_config_dir

    module = importlib.import_module(schema)
    module.register_configs()
    monkeypatch.delenv("PACE_DATA", raising=False)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        composed = compose(primary, return_hydra_config=True)
    choices = composed.hydra.runtime.choices
    defaults = OmegaConf.structured(module.TrainConfig if primary == "train" else module.EvalConfig)
    raw = OmegaConf.to_container(composed, resolve=False)
    disagree = []
    for key in _leaf_keys({k: v for k, v in raw.items() if k not in ("hydra", "eval")}):
        if OmegaConf.is_missing(defaults, key):  # no schema default (output_dir: Hydra's runtime dir)
            continue
        group = key.split(".")[0]
        source = f"configs/{group}/{choices[group]}.yaml" if group in choices else f"configs/{primary}.yaml"
        yaml_value, schema_value = OmegaConf.select(composed, key), OmegaConf.select(defaults, key)
        if OmegaConf.is_config(yaml_value):
            yaml_value, schema_value = OmegaConf.to_container(yaml_value), OmegaConf.to_container(schema_value)
        if yaml_value != schema_value:
            disagree.append(f"{key}: {source} says {yaml_value!r}, the schema {schema_value!r}")
    assert not disagree, "\n".join(disagree)
