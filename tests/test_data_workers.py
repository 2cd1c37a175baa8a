"""Loader workers start from the fork server, never by forking the (threaded) training process, and the server
outlives the signals a launcher sends to the training process's group."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from pace.data import create_eval_loader, create_eval_transform, make_quickstart_dataset
from pace.data.workers import GROUP_SIGNALS, init_worker, worker_context


def _blocked(pid: int) -> set[int]:
    """The signals `pid` blocks, from /proc (SigBlk is a hex mask, bit n - 1 for signal n)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            mask = int(line.split()[1], 16)
            return {n for n in range(1, 65) if mask >> (n - 1) & 1}
    raise AssertionError(f"no SigBlk in /proc/{pid}/status")


class _WhereAmI(IterableDataset):
    """Yields one row about the worker process that reads it: pid, parent pid, process group, and whether it
    blocks SIGTERM."""

    def __iter__(self):
        pid = os.getpid()
        yield torch.tensor([pid, os.getppid(), os.getpgid(0), int(signal.SIGTERM in _blocked(pid))])


def _worker_row() -> list[int]:
    loader = DataLoader(
        _WhereAmI(),
        batch_size=None,
        num_workers=1,
        multiprocessing_context=worker_context(),
        worker_init_fn=init_worker,
    )
    (row,) = list(loader)
    return row.tolist()


def test_workers_come_from_the_fork_server_which_blocks_the_group_signals_they_unblock():
    # A thread alive in this process while the workers start: what a training process always has.
    stop = threading.Event()
    busy = threading.Thread(target=stop.wait, daemon=True)
    busy.start()
    try:
        pid, parent, group, blocks_term = _worker_row()
    finally:
        stop.set()
    assert parent != os.getpid(), "the worker was forked from this process"
    server = parent
    assert Path(f"/proc/{server}/cmdline").read_bytes().find(b"forkserver") >= 0
    assert set(GROUP_SIGNALS) <= _blocked(server), _blocked(server)
    # The worker leads a process group of its own and takes SIGTERM again (the loader's shutdown signal).
    assert group == pid
    assert blocks_term == 0
    # This process's own mask is as it was: the training process still receives its stop signals.
    assert signal.SIGTERM not in _blocked(os.getpid())
    # The next loader reuses the running server.
    assert _worker_row()[1] == server


def test_a_server_that_died_is_restarted_with_the_group_signals_blocked():
    server = _worker_row()[1]
    os.kill(server, signal.SIGKILL)
    # Dead but not reaped: multiprocessing reaps its own server when it next checks on it.
    deadline = time.monotonic() + 30
    while Path(f"/proc/{server}/stat").read_text().split(")")[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the killed server did not die"
        time.sleep(0.05)
    restarted = _worker_row()[1]
    assert restarted != server
    assert set(GROUP_SIGNALS) <= _blocked(restarted)


def test_shard_loader_reads_the_same_through_workers_as_in_process(tmp_path: Path):
    root = tmp_path / "shards"
    make_quickstart_dataset(root, image_size=32, train_per_class=2, val_per_class=2, shard_size=10, workers=1)
    transform = create_eval_transform(input_size=32)
    read = {}
    for workers in (0, 2):
        loader = create_eval_loader(str(root), batch_size=5, transform=transform, num_workers=workers)
        batches = list(loader)
        keys = [k for _, _, ks in batches for k in ks]
        images = torch.cat([b[0] for b in batches])
        order = sorted(range(len(keys)), key=keys.__getitem__)
        read[workers] = (sorted(keys), images[order])
    assert read[0][0] == read[2][0] and len(read[0][0]) == 20
    torch.testing.assert_close(read[0][1], read[2][1], rtol=0, atol=0)


def test_a_transform_that_cannot_reach_the_workers_fails_when_the_loader_is_made(tmp_path: Path):
    root = tmp_path / "shards"
    make_quickstart_dataset(root, image_size=32, train_per_class=1, val_per_class=2, shard_size=10, workers=1)
    transform = create_eval_transform(input_size=32)
    unpicklable = lambda image: transform(image)  # noqa: E731 - the closure a user might write
    with pytest.raises(ValueError, match="num_workers > 0 sends the dataset .* lambda"):
        create_eval_loader(str(root), batch_size=5, transform=unpicklable, num_workers=1)
    # In the main process nothing is pickled: the same transform reads every sample.
    loader = create_eval_loader(str(root), batch_size=5, transform=unpicklable, num_workers=0)
    assert sum(len(keys) for _, _, keys in loader) == 20
