"""The quickstart dataset's generation killed midway: the output never holds half a dataset, and the next run
(as training's first use does) writes it whole instead of taking the half for the dataset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from pace.data import make_quickstart_dataset, read_info
from pace.data.info import write_info

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"train_per_class": 12, "val_per_class": 3, "shard_size": 40, "image_size": 32, "workers": 1}

# Generates the dataset, announcing each finished split on stdout and stopping after the train split, so the test
# can SIGKILL it there: between the two splits, where the earlier writer left a train-only _info.json.
_STOP_AFTER_TRAIN = """
import json, sys, time
import pace.data.writer as writer
from pace.data import make_quickstart_dataset

write_split = writer._write_split

def announcing(*args, **kwargs):
    entry = write_split(*args, **kwargs)
    print("finished", entry["name"], flush=True)
    if entry["name"] == "train":
        time.sleep(600)
    return entry

writer._write_split = announcing
make_quickstart_dataset(sys.argv[1], **json.loads(sys.argv[2]))
"""


def _contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_generation_killed_between_splits_leaves_no_dataset_and_the_rerun_completes_it(tmp_path):
    reference = tmp_path / "reference"
    make_quickstart_dataset(reference, **SMALL)
    out = tmp_path / "shapes"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", _STOP_AFTER_TRAIN, str(out), json.dumps(SMALL)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "finished train"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()  # nothing published: no _info.json that a rerun could take as "already present"
    staging = tmp_path / ".shapes.partial"
    assert sorted(p.name for p in staging.iterdir()) == [f"shapes-train-{i:06d}.tar" for i in range(3)]

    info = make_quickstart_dataset(out, **SMALL)
    assert [info["splits"][split]["num_samples"] for split in ("train", "val")] == [120, 30]
    assert not staging.exists()
    assert _contents(out) == _contents(reference)  # byte for byte what an uninterrupted run writes


def test_a_train_only_dataset_left_by_an_earlier_version_is_written_again(tmp_path):
    # What an interrupted run of the earlier writer left: both splits' parameters, only the train split listed.
    out = tmp_path / "shapes"
    complete = make_quickstart_dataset(out, **SMALL)
    for name in complete["splits"]["val"]["filenames"]:
        (out / name).unlink()
    write_info(out, {**complete, "splits": {"train": complete["splits"]["train"]}})
    info = make_quickstart_dataset(out, **SMALL)
    assert info == complete == read_info(out)
    assert all((out / name).is_file() for entry in info["splits"].values() for name in entry["filenames"])
    # A listed shard that is gone is noticed too.
    (out / complete["splits"]["train"]["filenames"][1]).unlink()
    assert make_quickstart_dataset(out, **SMALL) == complete
    assert (out / complete["splits"]["train"]["filenames"][1]).is_file()
