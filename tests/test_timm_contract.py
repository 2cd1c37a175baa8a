"""timm's own generic model tests (``tests/test_models.py`` of the timm sdist), run on PACE-ViT variants.

timm's file picks models by name pattern when it is imported, so PACE-ViT is never selected there; its test
functions are called here directly for our model names. The file is not part of this repository: it is taken
from the sdist of the installed timm version (``pip download``), cached in ``~/.cache/pace/timm-tests``
(``PACE_TIMM_TESTS_CACHE`` overrides), and the tests skip with the reason when it cannot be downloaded.

timm tests that do not apply to PACE-ViT:

* ``test_model_default_cfgs``: the variant for models whose ``forward_features`` returns an NCHW map with a
  ``pool_size``; token models (timm's vit, deit, cait, xcit) run ``test_model_default_cfgs_non_std``, as here.
* ``test_model_forward_torchscript``, ``test_model_forward_fx_torchscript``: the PACE block cannot be scripted
  (its functional core takes keyword-only arguments with defaults; the sketch schedule keeps a Python-side cache
  keyed by hashed seeds). ``torch.fx`` tracing (block as a leaf) and ``torch.compile`` are the graph paths.
* ``test_model_inference``, ``test_model_load_pretrained``, ``test_model_features_pretrained``: they download
  published weights; none are published. Local-file loading is tested in ``test_checkpoint_filter.py``.
* ``test_forward_intermediates_stop_early_final_norm``: expects the final norm to follow only the last stage of
  a hierarchical model; an isotropic ViT normalises every intermediate with it (timm's ``test_vit`` fails too).
* ``test_prune_intermediate_layers_last_feature``: pools ``forward_features`` as an NCHW map (``mean((2, 3))``).
* ``test_reset_classifier_keeps_pool``: uses ``global_pool='max'``, a CNN pooling; ``test_models.py`` checks the
  same contract with token / avg pooling.
* The remaining tests in that file name other model families (swin, naflexvit, efficientnet, ...).
"""

import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import timm
import torch

import pace  # noqa: F401  (registers the models)

TEST_MODEL = "pace_vit_test"
REAL_MODEL = "pace_vit_tiny_patch16_224"
ALL_MODELS = sorted(timm.list_models("pace_vit*"))


def _cache_dir() -> Path:
    default = Path.home() / ".cache" / "pace" / "timm-tests"
    return Path(os.environ.get("PACE_TIMM_TESTS_CACHE", default)) / timm.__version__


def _download_test_file(target: Path) -> None:
    version = timm.__version__
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"timm=={version}"]
        cmd += ["--no-binary", ":all:", "--no-deps", "--quiet", "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        sdists = list(Path(tmp).glob("timm-*.tar.gz"))
        if result.returncode or not sdists:
            pytest.skip(f"cannot download the timm=={version} sdist for its model tests: {result.stderr[-500:]}")
        with tarfile.open(sdists[0]) as archive:
            member = next((m for m in archive.getmembers() if m.name.endswith("/tests/test_models.py")), None)
            if member is None:
                pytest.skip(f"the timm=={version} sdist has no tests/test_models.py")
            data = archive.extractfile(member).read()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    partial.write_bytes(data)
    partial.replace(target)  # atomic: a concurrent or interrupted run never sees half a file


@pytest.fixture(scope="module")
def timm_tests(pytestconfig):
    """timm's ``tests/test_models.py`` for the installed timm version, imported under a private name."""
    target = _cache_dir() / "test_models.py"
    if not target.exists():
        _download_test_file(target)
    # Its decorators use timm's own markers, which --strict-markers rejects unless they are declared.
    builtin = {"parametrize", "timeout", "skip", "skipif", "xfail", "usefixtures", "filterwarnings"}
    for marker in set(re.findall(r"@pytest\.mark\.(\w+)", target.read_text())) - builtin:
        pytestconfig.addinivalue_line("markers", f"{marker}: marker of timm's own test suite")
    spec = importlib.util.spec_from_file_location("timm_sdist_test_models", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cfg_device(module) -> str:
    return "meta" if module._HAS_DEVICE_CONTEXT else "cpu"


# (timm test function, its arguments after the model name)
CASES = [
    ("test_model_forward", lambda m: (1,)),
    ("test_model_backward", lambda m: (2,)),
    ("test_model_forward_features", lambda m: (1,)),
    ("test_model_forward_intermediates_features", lambda m: (1,)),
    ("test_model_forward_intermediates", lambda m: (1,)),
    ("test_prune_intermediate_layers_params_used", lambda m: ()),
    ("test_prune_intermediate_layers_contract", lambda m: ()),
    ("test_forward_after_prune_intermediate_layers", lambda m: ()),
    ("test_head_hidden_size", lambda m: ({},)),
    ("test_catavgmax_unsupported", lambda m: ()),
    ("test_headless_checkpoint_reload", lambda m: ({},)),
    ("test_model_init_weights_after_to_empty", lambda m: ({},)),
    ("test_model_forward_fx", lambda m: (1,)),
    ("test_model_backward_fx", lambda m: (2,)),
]


@pytest.mark.parametrize("model_name", [TEST_MODEL, REAL_MODEL])
@pytest.mark.parametrize("test_name, extra_args", CASES, ids=[c[0] for c in CASES])
def test_timm_generic(timm_tests, test_name, extra_args, model_name):
    torch.manual_seed(0)
    getattr(timm_tests, test_name)(model_name, *extra_args(timm_tests))


def test_timm_prune_class_token_avg_pool(timm_tests):
    # Runs at 224 px and compares with patch_embed.num_patches, so it needs a 224 px variant.
    timm_tests.test_prune_class_token_avg_pool(REAL_MODEL)


@pytest.mark.parametrize("model_name", ALL_MODELS)
def test_timm_default_cfgs_and_api_contract(timm_tests, model_name):
    # On the meta device this costs no weights, so every variant is checked.
    timm_tests.test_model_default_cfgs_non_std(model_name, 1, _cfg_device(timm_tests))
