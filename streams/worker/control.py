"""Broadcast inputs every worker must see whole, whatever partitions it owns: model versions to swap to,
and new catalogue items. Read with group-less aiokafka consumers (a consumer group would split them).

A new version loads and verifies in a background thread; the swap is one reference assignment between
two micro-batches, so no event waits on a load and none is dropped. A bad artifact (checksum mismatch,
wrong dimension) is refused with a log line and the old version stays live.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import numpy as np

from streams.artifacts import BadArtifact, load_artifact
from streams.worker.recommender import Recommender

log = logging.getLogger("lsti.control")


class Live:
    """The recommender in service; agents read `live.recommender` once per micro-batch."""

    def __init__(self, recommender: Recommender, k: int, max_lateness: float):
        self.recommender = recommender
        self.k = k
        self.max_lateness = max_lateness
        self.swaps = 0
        self.refused = 0
        self.items_added = 0
        self._text_encoder = None

    def load(self, path: Path) -> Recommender:
        """Load and check a version off the event loop; raise BadArtifact if it must not go live."""
        art = load_artifact(Path(path), index_threads=1)
        cur = self.recommender.artifact
        if art.model.cfg.dim != cur.model.cfg.dim and art.weights_version == cur.weights_version:
            raise BadArtifact(f"{path}: dimension {art.model.cfg.dim} does not match its weights version")
        return Recommender(art, k=self.k, max_lateness=self.max_lateness,
                           state_dtype=self.recommender.codec.dtype.name)

    async def swap_to(self, msg: dict) -> bool:
        version, path = msg.get("version"), msg.get("path")
        if not version or not path or version == self.recommender.version:
            return False
        loop = asyncio.get_running_loop()
        try:
            new = await loop.run_in_executor(None, self.load, Path(path))
        except (BadArtifact, OSError, ValueError, KeyError, RuntimeError) as exc:
            self.refused += 1
            log.error("refused model version %s: %s; %s stays live", version, exc, self.recommender.version)
            return False
        old, self.recommender = self.recommender, new
        self.swaps += 1
        log.info("swapped model version %s -> %s (%d items)", old.version, new.version, len(new.item_ids) - 1)
        return True

    def embed(self, texts: list[str]) -> np.ndarray:
        """BERT vectors of new items' texts (run off the event loop; the model loads on first use)."""
        if self._text_encoder is None:
            from encoders.text import TextEncoder

            self._text_encoder = TextEncoder(device="cpu")
        return self._text_encoder.encode(texts, progress=False)

    async def add_items(self, items: list[tuple[str, str]]) -> int:
        """Make new items recommendable at once, ranked by their text alone (cold start).

        BERT runs in a thread; the index and maps change on the loop thread, between micro-batches.
        """
        new = [(iid, text) for iid, text in dict(items).items() if iid not in self.recommender.item_code]
        if not new:
            return 0
        text_vecs = await asyncio.get_running_loop().run_in_executor(None, self.embed, [t for _, t in new])
        rec = self.recommender
        new = [(iid, t) for iid, t in new if iid not in rec.item_code]
        rec.add_items([iid for iid, _ in new], rec.online.text_item_vectors(text_vecs[: len(new)]))
        self.items_added += len(new)
        log.info("added %d new items to the live index (now %d)", len(new), len(rec.item_ids) - 1)
        return len(new)


async def _consume_all(bootstrap: str, topic: str, from_latest_n: int | None, handle, security: dict) -> None:
    """Feed every record of `topic` (all partitions) to `handle`; start `from_latest_n` back from the end."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None, **security)
    await consumer.start()
    try:
        parts = None
        while not parts:
            # A group-less consumer subscribes to nothing, so ask the client for this topic's metadata.
            await consumer._client.add_topic(topic)
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                await asyncio.sleep(1.0)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        if from_latest_n is not None:
            ends = await consumer.end_offsets(tps)
            for tp in tps:
                consumer.seek(tp, max(0, ends[tp] - from_latest_n))
        else:
            await consumer.seek_to_beginning(*tps)
        log.info("following %s (%d partitions)", topic, len(tps))
        while True:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                await handle(records)
    finally:
        await consumer.stop()


async def watch_versions(live: Live, bootstrap: str, topic: str, security: dict) -> None:
    """Follow `model-versions` from its latest record on."""

    async def handle(records) -> None:
        for m in records:
            try:
                msg = json.loads(m.value)
            except (TypeError, ValueError):
                log.error("ignored a malformed control message at offset %d", m.offset)
                continue
            await live.swap_to(msg)

    await _consume_all(bootstrap, topic, 1, handle, security)


async def watch_items(live: Live, bootstrap: str, topic: str, security: dict) -> None:
    """Follow the `items` topic from the beginning: {"item_id": ..., "text": ...} per record."""
    async def handle(records) -> None:
        items = []
        for m in records:
            try:
                rec = json.loads(m.value)
                items.append((str(rec["item_id"]), str(rec["text"])))
            except (TypeError, ValueError, KeyError):
                log.error("ignored a malformed item at offset %d", m.offset)
        if items:
            await live.add_items(items)

    await _consume_all(bootstrap, topic, None, handle, security)
