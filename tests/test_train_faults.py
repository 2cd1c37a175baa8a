"""The fault-injection hook lives in the environment, not in the run config: parsed strictly, off by default."""

import pytest

from pace.errors import UsageError
from pace.train.config import TrainerConfig
from pace.train.faults import NanFault, nan_fault_from_env


def test_no_variable_no_fault_and_the_config_has_no_switch():
    assert nan_fault_from_env({}) is None
    assert not any(name.startswith("debug_nan") for name in TrainerConfig.__dataclass_fields__)


def test_the_variables_name_the_update_and_the_rank():
    fault = nan_fault_from_env({"PACE_FAULT_NAN_STEP": "3", "PACE_FAULT_NAN_RANK": "1"})
    assert fault == NanFault(step=3, rank=1)
    assert fault.poisons(3, 1) and not fault.poisons(3, 0) and not fault.poisons(2, 1)
    assert nan_fault_from_env({"PACE_FAULT_NAN_STEP": "5"}) == NanFault(step=5, rank=0)


@pytest.mark.parametrize(
    "environ", [{"PACE_FAULT_NAN_STEP": "three"}, {"PACE_FAULT_NAN_STEP": "1", "PACE_FAULT_NAN_RANK": "x"}]
)
def test_a_bad_value_names_the_variable(environ):
    bad = next(name for name, value in environ.items() if not value.isdigit())
    with pytest.raises(UsageError, match=f"environment variable {bad}="):
        nan_fault_from_env(environ)
