import subprocess
import sys


def test_import_has_no_side_effects_beyond_registration():
    # A fresh interpreter: importing pace must not initialise distributed state, CUDA or logging handlers.
    code = (
        "import logging, torch, pace; "
        "assert not torch.distributed.is_initialized(); "
        "assert not logging.getLogger().handlers, logging.getLogger().handlers; "
        "print(pace.__version__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0.1.0"
