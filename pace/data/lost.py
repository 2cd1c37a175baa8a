"""Lost-sample accounting: what damaged shards take out of an epoch, counted in samples rather than shards.

A skipped sample costs one sample. A shard that is empty, truncated or damaged costs the samples its
`_info.json` count promised and the reader never got (`BadData.lost`), so four empty shards of eight weigh half
the epoch against `max_error_fraction`, not four samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from pace.data.shards import BadData


class OncePerShard:
    """Forwards bad items to a list, each damaged shard once per reader and epoch.

    A training reader whose share comes up short reads its share again; the shard that came up short then
    reports the same loss a second time, which would count the missing samples twice.

    Args:
        target: the list that receives the items.
    """

    def __init__(self, target: list[BadData]):
        self.target = target
        self._shards: set[str] = set()

    def append(self, item: BadData) -> None:
        if item.kind == "bad_shard":
            if item.shard in self._shards:
                return
            self._shards.add(item.shard)
        self.target.append(item)


def shared_loss(items: Iterable[BadData], *, offset: int, stride: int, expected: int | None) -> list[BadData]:
    """Damaged-shard items of a reader that takes samples `offset, offset + stride, ...` of the shard, with the
    loss cut down to that reader's share of the missing samples.

    Evaluation readers that share a shard each read it to its end, so each records the damage.

    Args:
        items: what reading the shard recorded.
        offset: the reader's first sample of the shard.
        stride: readers sharing the shard.
        expected: the shard's sample count from the info file, if known.
    """
    if stride == 1:
        return list(items)
    shared = []
    for item in items:
        if item.kind == "bad_shard":
            if expected is None:  # the loss is unknown (counted as 1): one reader counts it
                lost = item.lost if offset == 0 else 0
            else:  # the missing samples are the shard's tail, [expected - lost, expected)
                lost = len(range(offset, expected, stride)) - len(range(offset, expected - item.lost, stride))
            item = dataclasses.replace(item, lost=lost)
        shared.append(item)
    return shared


def lost_samples(items: Iterable[BadData]) -> int:
    """Samples of the data the items stand for (see `BadData.lost`)."""
    return sum(item.lost for item in items)
