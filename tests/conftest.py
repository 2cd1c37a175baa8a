import os

import pytest
import torch

# Third-party test files kept as pinned copies; tests/test_timm_contract.py calls into them.
collect_ignore_glob = ["vendor/*"]


def pytest_configure(config):
    # Two-core CI machines: one intra-op thread per test process keeps timings and parallel subprocesses sane.
    torch.set_num_threads(int(os.environ.get("PACE_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
