"""The distributed environment is resolved from torchrun, srun or nothing, in that order."""

from __future__ import annotations

import logging
import socket

import pytest
import torch
import torch.distributed as dist

from pace.distributed import DistEnv, first_slurm_host, process_group, resolve_dist_env


def test_single_process_without_launcher_variables():
    assert resolve_dist_env({}) == DistEnv()
    assert not DistEnv().is_distributed and DistEnv().is_main


def test_torchrun_variables():
    env = resolve_dist_env(
        {
            "RANK": "5",
            "WORLD_SIZE": "16",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "node7",
            "MASTER_PORT": "29400",
        }
    )
    assert env == DistEnv(5, 16, 1, 4, "node7", 29400, "torchrun")
    assert env.is_distributed and not env.is_main


def test_torchrun_started_by_srun_wins_over_the_slurm_variables():
    slurm = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "gpu[1-2]", "SLURM_JOB_ID": "9"}
    torchrun = {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "MASTER_ADDR": "gpu1", "MASTER_PORT": "29500"}
    env = resolve_dist_env({**slurm, **torchrun})
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("torchrun", 6, 8, 2)


def test_srun_one_task_per_gpu():
    env = resolve_dist_env(
        {
            "SLURM_PROCID": "9",
            "SLURM_STEP_NUM_TASKS": "12",
            "SLURM_LOCALID": "1",
            "SLURM_NODEID": "2",
            "SLURM_STEP_TASKS_PER_NODE": "4(x2),4",
            "SLURM_STEP_NODELIST": "gpu[007-009]",
            "SLURM_JOB_ID": "123456",
        }
    )
    assert env == DistEnv(9, 12, 1, 4, "gpu007", 20000 + 123456 % 20000, "slurm")


def test_batch_script_itself_is_a_single_process():
    # Inside the sbatch script (no srun step) SLURM_PROCID=0 but no step task count: not rank 0 of many.
    env = resolve_dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[1-2]"})
    assert env == DistEnv()


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [("gpu12", "gpu12"), ("gpu[003-008,010]", "gpu003"), ("a1,b2", "a1"), ("nid[5,7-9]-ib", "nid5-ib")],
)
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_process_group_quiets_other_ranks_and_leaves_the_group_on_error():
    root = logging.getLogger()
    level = root.level
    # A one-process gloo group joined beforehand stands in for a job's group (init_distributed keeps an existing one).
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="inside"), process_group(DistEnv(rank=1, world_size=2), "cpu") as device:
            assert device == torch.device("cpu")
            assert root.level == logging.WARNING  # rank 1 logs warnings only
            raise RuntimeError("inside")
        assert not dist.is_initialized()  # left on the way out of an error
        root.setLevel(logging.INFO)
        with process_group(DistEnv(), "cpu"):
            assert root.level == logging.INFO  # rank 0 keeps its level
    finally:
        root.setLevel(level)
        if dist.is_initialized():
            dist.destroy_process_group()
