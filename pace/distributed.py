"""The distributed environment, resolved in one place and passed down as a `DistEnv` (no module globals).

Launchers, in order of precedence:
1. torchrun (also torchrun started by srun, one per node): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT.
2. srun starting one task per device: SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, SLURM_STEP_NODELIST.
3. A single process.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pace.errors import RunError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job.

    Args:
        rank: global rank.
        world_size: number of processes in the job.
        local_rank: rank on this node (selects the GPU).
        local_world_size: processes on this node.
        master_addr: host of rank 0 (rendezvous).
        master_port: rendezvous port.
        launcher: "torchrun", "slurm" or "single".
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_slurm_host(nodelist: str) -> str:
    """First host name of a compressed SLURM node list (`gpu[003-008,010],cpu1` -> `gpu003`).

    Args:
        nodelist: the value of SLURM_JOB_NODELIST or SLURM_STEP_NODELIST.
    """
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?([^,]*)", nodelist.strip())
    if match is None:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges, suffix = match.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}{suffix}"


def _slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    # SLURM_STEP_TASKS_PER_NODE looks like "4(x2),3": expand to one count per node.
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ValueError(f"cannot parse SLURM tasks-per-node {tasks_per_node!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node_id]


def resolve_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables into a `DistEnv`.

    Args:
        environ: the process environment (default `os.environ`); tests pass a dict.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    # SLURM_STEP_NUM_TASKS exists inside an srun step only, not in the batch script itself, so a plain
    # `python ...` in an sbatch file is not mistaken for rank 0 of many.
    if "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", 1)) > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
        job_id = int(env.get("SLURM_JOB_ID", 0))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_STEP_NUM_TASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=_slurm_tasks_on_node(
                env.get("SLURM_STEP_TASKS_PER_NODE", "1"), int(env.get("SLURM_NODEID", 0))
            ),
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodelist),
            # A port derived from the job id keeps two jobs sharing a node from colliding.
            master_port=int(env.get("MASTER_PORT") or 20000 + job_id % 20000),
            launcher="slurm",
        )
    return DistEnv()


def cpus_per_process(env: DistEnv) -> int:
    """The CPUs this process may use: its affinity mask (what SLURM or taskset granted, not the machine's core
    count), shared among the ranks on this node when they share one mask (torchrun).

    Args:
        env: this process's place in the job.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity masks
        cpus = os.cpu_count() or 1
    sharing = env.local_world_size if env.launcher == "torchrun" else 1
    return max(1, cpus // sharing)


def capped_workers(requested: int, env: DistEnv) -> int:
    """`requested` DataLoader workers, at most one per CPU this process may use (0 stays 0: load in-process).

    Args:
        requested: the configured worker count.
        env: this process's place in the job.
    """
    return min(requested, cpus_per_process(env))


def select_device(env: DistEnv, requested: str = "auto") -> torch.device:
    """The device this rank computes on.

    Args:
        env: this process's place in the job.
        requested: "auto" (the local GPU if there is one, else CPU), "cpu", "cuda" (the local GPU) or "cuda:N".

    Raises:
        ValueError: a GPU was asked for and CUDA is not available.
    """
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} was asked for, but CUDA is not available on this machine")
    if requested.startswith("cuda:"):
        return torch.device(requested)
    return torch.device("cuda", env.local_rank % torch.cuda.device_count())


class RendezvousError(RunError):
    """Not every rank joined the process group in time."""


def _set_timeout(seconds: float) -> None:
    # `set_timeout` is public from torch 2.13; earlier releases have the private function it replaced.
    setter = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout
    setter(timedelta(seconds=seconds))


def init_distributed(
    env: DistEnv, device: torch.device, timeout_s: float = 1800.0, rendezvous_timeout_s: float = 300.0
) -> None:
    """Join the process group (NCCL on GPU, gloo on CPU); a no-op for one process.

    Args:
        env: this process's place in the job.
        device: this rank's device (from `select_device`).
        timeout_s: collective timeout once every rank has joined.
        rendezvous_timeout_s: how long to wait for every rank to join (a rank that died while starting must not
            keep the others waiting for the collective timeout).

    Raises:
        RendezvousError: naming the rendezvous address and the wait, when some rank never joined.
    """
    if not env.is_distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(seconds=rendezvous_timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    except (RuntimeError, dist.DistError) as e:
        raise RendezvousError(
            f"rank {env.rank} of {env.world_size}: not every rank joined the rendezvous at "
            f"{env.master_addr}:{env.master_port} within {rendezvous_timeout_s:g} s (a rank failed while starting: "
            f"see its log; or the ranks were given different MASTER_ADDR/MASTER_PORT): {str(e).splitlines()[0]}"
        ) from e
    _set_timeout(timeout_s)


def destroy_distributed() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(
    env: DistEnv, requested_device: str = "auto", timeout_s: float = 1800.0, rendezvous_timeout_s: float = 300.0
) -> Iterator[torch.device]:
    """This rank's device, inside the process group: what `pace-train` and `pace-eval` run their work in.

    Selects the device (`select_device`), leaves ranks other than 0 logging warnings only (one progress log per
    job, not one per rank), joins the process group (`init_distributed`) and leaves it when the block ends,
    normally or by an exception.

    Args:
        env: this process's place in the job.
        requested_device: as for `select_device`.
        timeout_s: collective timeout, as for `init_distributed`.
        rendezvous_timeout_s: how long to wait for every rank to join, as for `init_distributed`.

    Yields:
        The device this rank computes on.
    """
    device = select_device(env, requested_device)
    if not env.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    init_distributed(env, device, timeout_s, rendezvous_timeout_s)
    try:
        yield device
    finally:
        destroy_distributed()


def all_reduce_sum_values(values: list[float], env: DistEnv, device: torch.device) -> list[float]:
    """Sums over ranks of a few scalars or 0/1 flags, in one collective.

    Args:
        values: this rank's values.
        env: this process's place in the job.
        device: the device collectives run on (CUDA for NCCL).
    """
    if not env.is_distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_gather_object(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's `obj`, indexed by rank.

    Args:
        obj: a picklable object.
        env: this process's place in the job.
    """
    if not env.is_distributed:
        return [obj]
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def all_gather_rows(rows: torch.Tensor, counts: list[int], env: DistEnv) -> list[torch.Tensor]:
    """Every rank's `rows`, on the CPU, indexed by rank; the first dimension may differ per rank.

    Each rank pads its rows to the longest, the padded tensors are all-gathered and trimmed again.

    Args:
        rows: this rank's (n_rank, ...) tensor; the trailing dimensions and dtype agree over ranks.
        counts: every rank's n_rank, indexed by rank (from an `all_gather_object`).
        env: this process's place in the job.
    """
    if not env.is_distributed:
        return [rows.cpu()]
    # NCCL moves only CUDA tensors; gloo only CPU ones.
    nccl = dist.get_backend() == dist.Backend.NCCL
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    padded = rows.new_zeros((max(counts), *rows.shape[1:]), device=device)
    padded[: rows.shape[0]] = rows.to(device)
    out = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(out, padded)
    return [t[:n].cpu() for t, n in zip(out, counts)]


def broadcast_buffers(module: torch.nn.Module, env: DistEnv) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics), in place.

    Args:
        module: the same module on every rank.
        env: this process's place in the job.
    """
    if env.is_distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def barrier(env: DistEnv) -> None:
    """Wait for every rank.

    Args:
        env: this process's place in the job.
    """
    if env.is_distributed:
        dist.barrier()
