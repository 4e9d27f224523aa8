"""Delivery continuity per partition (streams/worker/lanes.py), against a consumer that only counts.

Each case is a sequence of batches as the consumer numbers them; the lane must apply every offset once
in order or seek back over a hole. The worker-level proof is in tests/test_faults.py
(`test_a_lost_fetch_or_delivery_is_read_again`).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from faust.types import TP

from streams.worker.lanes import Lanes

TPX = TP("events", 0)


class Consumer:
    """Numbers runs and seeks the way BatchConsumer does; remembers the seeks."""

    def __init__(self, committed: int = 0) -> None:
        self.committed = committed
        self.n = 0
        self.seeks: list[int] = []

    def seq(self, tp):
        return self.n

    async def seek(self, tp, offset):
        self.n += 1
        self.seeks.append(offset)

    async def restart_point(self, tp):
        return self.committed

    def run(self, lo: int, hi: int, gen: int = 1):
        """A fetched run lo..hi, numbered next."""
        self.n += 1
        return SimpleNamespace(tp=TPX, partition=0, first=lo, offset=hi, seq=self.n, generation_id=gen)


def admit(lanes, consumer, msg, gen: int = 1):
    return asyncio.run(lanes.admit(msg, consumer, gen))


def apply(lanes, consumer, msg, gen: int = 1):
    start = admit(lanes, consumer, msg, gen)
    if start is not None:
        lanes.applied(msg)
    return start


def test_a_generation_starts_at_the_committed_offset_then_runs_continue():
    c, lanes = Consumer(committed=100), Lanes("events")
    assert apply(lanes, c, c.run(250, 300)) is None and c.seeks == [100]  # whatever came first: re-read
    assert apply(lanes, c, c.run(100, 149)) == 100
    assert apply(lanes, c, c.run(150, 199)) == 150
    assert lanes.lanes[0].next_offset == 200 and lanes.restarts == 1


def test_a_run_after_a_lost_one_seeks_back_and_stale_runs_are_dropped():
    c, lanes = Consumer(committed=0), Lanes("events")
    apply(lanes, c, c.run(0, 0))
    assert apply(lanes, c, c.run(0, 49)) == 0
    c.run(50, 99)  # fetched, never delivered (Faust's stream skipped it)
    after, stale = c.run(100, 149), c.run(150, 199)  # both fetched before the agent saw the first
    assert apply(lanes, c, after) is None and c.seeks[-1] == 50 and lanes.rereads == 1
    assert apply(lanes, c, stale) is None
    assert apply(lanes, c, c.run(50, 120)) == 50  # the first run after the seek
    assert lanes.lanes[0].next_offset == 121


def test_after_a_seek_the_first_run_crosses_offsets_without_records():
    """A seek to an offset that holds no record (a transaction marker): the next run starts past it and
    continues the lane; it must not be read again forever."""
    c, lanes = Consumer(committed=0), Lanes("events")
    apply(lanes, c, c.run(0, 0))
    apply(lanes, c, c.run(0, 9))
    c.run(10, 19)  # lost
    assert apply(lanes, c, c.run(21, 30)) is None and c.seeks[-1] == 10
    assert apply(lanes, c, c.run(11, 30)) == 10  # 10 is a marker: the run after the seek starts at 11
    assert lanes.rereads == 1


def test_an_overlapping_run_after_a_foreign_seek_is_applied_from_its_first_record():
    c, lanes = Consumer(committed=0), Lanes("events")
    apply(lanes, c, c.run(0, 0))
    apply(lanes, c, c.run(0, 99))
    asyncio.run(c.seek(TPX, 60))  # the stall watch re-reads from the commit
    assert apply(lanes, c, c.run(60, 130)) == 60  # continues the seek it did not make: judged by offsets
    assert lanes.lanes[0].next_offset == 131 and lanes.rereads == 0


def test_an_older_generation_is_dropped_and_a_new_one_restarts():
    c, lanes = Consumer(committed=0), Lanes("events")
    apply(lanes, c, c.run(0, 0))
    apply(lanes, c, c.run(0, 99))
    assert apply(lanes, c, c.run(100, 120, gen=1), gen=2) is None  # fetched before the rebalance
    c.committed = 80  # the group's commit: where every owner of the new generation starts
    assert apply(lanes, c, c.run(100, 120, gen=2), gen=2) is None and c.seeks[-1] == 80
    assert apply(lanes, c, c.run(80, 120, gen=2), gen=2) == 80
