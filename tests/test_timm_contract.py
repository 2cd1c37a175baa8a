"""timm's own generic model tests (``tests/test_models.py`` of the timm sdist), run on PACE-ViT variants.

timm's file picks models by name pattern when it is imported, so PACE-ViT is never selected there; its test
functions are called here directly for our model names. A pinned, unmodified copy of the file (timm
``TIMM_TESTS_VERSION``, with timm's licence) lives in ``tests/vendor/timm``: nothing is fetched at test time, so
these tests cannot skip for want of a network. Update the copy deliberately when the timm requirement moves.

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
import re
from pathlib import Path

import pytest
import timm
import torch

import pace  # noqa: F401  (registers the models)

TEST_MODEL = "pace_vit_test"
REAL_MODEL = "pace_vit_tiny_patch16_224"
ALL_MODELS = sorted(timm.list_models("pace_vit*"))
TIMM_TESTS_VERSION = "1.0.31"
TIMM_TESTS_FILE = Path(__file__).parent / "vendor" / "timm" / "test_models.py"


def test_vendored_copy_matches_the_required_timm():
    # The copy and the lower bound of the timm requirement move together (see the copy's header).
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert f'"timm>={TIMM_TESTS_VERSION}"' in pyproject
    assert f"timm {TIMM_TESTS_VERSION}," in TIMM_TESTS_FILE.read_text().splitlines()[0]


@pytest.fixture(scope="module")
def timm_tests(pytestconfig):
    """timm's ``tests/test_models.py`` (the pinned copy), imported under a private name."""
    # Its decorators use timm's own markers, which --strict-markers rejects unless they are declared.
    builtin = {"parametrize", "timeout", "skip", "skipif", "xfail", "usefixtures", "filterwarnings"}
    for marker in set(re.findall(r"@pytest\.mark\.(\w+)", TIMM_TESTS_FILE.read_text())) - builtin:
        pytestconfig.addinivalue_line("markers", f"{marker}: marker of timm's own test suite")
    spec = importlib.util.spec_from_file_location("timm_vendored_test_models", TIMM_TESTS_FILE)
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
