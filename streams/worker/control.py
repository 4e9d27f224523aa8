"""Broadcast inputs every worker must see whole, whatever partitions it owns: model versions to swap to,
and catalogue changes. Read with group-less aiokafka consumers (a consumer group would split them).

A new version loads and verifies in a background thread; the swap is one reference assignment between
two micro-batches, so no event waits on a load and none is dropped. A bad artifact (checksum mismatch,
wrong dimension) is refused with a log line and the old version stays live.

Catalogue changes (streams/contracts/items.py): an added item is embedded by BERT and appended to the live
index; a deleted or unavailable one is masked in the index (never recommended, events naming it still
applied). Both carry over to the next version: the items it lacks are added again from their BERT vectors,
and the mask is set again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import numpy as np

from streams.artifacts import BadArtifact, load_artifact
from streams.contracts.items import BadItemMessage, parse_item_change
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
        self.items_malformed = 0
        self._text_encoder = None
        # What the `items` topic said, kept for the next version: every added item's text, the BERT vectors of
        # those embedded here, and the items not recommendable now (id -> "deleted" or "unavailable").
        self._texts: dict[str, str] = {}
        self._vectors: dict[str, np.ndarray] = {}
        self.hidden: dict[str, str] = {}

    def load(self, path: Path, carry: dict[str, str] | None = None) -> Recommender:
        """Load and check a version off the event loop; raise BadArtifact if it must not go live. `carry`:
        the `items` topic's additions (id -> text), given to the new version (`_carry_over`)."""
        art = load_artifact(Path(path), index_threads=1)
        cur = self.recommender.artifact
        if art.model.cfg.dim != cur.model.cfg.dim and art.weights_version == cur.weights_version:
            raise BadArtifact(f"{path}: dimension {art.model.cfg.dim} does not match its weights version")
        new = Recommender(art, k=self.k, max_lateness=self.max_lateness,
                          state_dtype=self.recommender.codec.dtype.name, explain=self.recommender.explain)
        if carry:
            self._carry_over(new, carry, embed=True)
        return new

    def _carry_over(self, rec: Recommender, texts: dict[str, str], embed: bool) -> int:
        """Give `rec` the items the `items` topic added: their keys (states name live-added items by key, so
        a user's recent items keep pointing at the same items whatever codes this version gives them), and
        those it lacks (the nightly did not see them) added again from their BERT vectors, which are computed
        here when `embed` (in the loading thread) and never were. Returns how many were added."""
        rec.register_live(texts)
        missing = [i for i in texts if i not in rec.item_code]
        todo = [i for i in missing if i not in self._vectors]
        if todo and embed:
            self._vectors.update(zip(todo, self.embed([texts[i] for i in todo]), strict=True))
        missing = [i for i in missing if i in self._vectors]
        if missing:
            rec.add_items(missing, rec.online.text_item_vectors(np.stack([self._vectors[i] for i in missing])))
        return len(missing)

    async def swap_to(self, msg: dict) -> bool:
        version, path = msg.get("version"), msg.get("path")
        if not version or not path or version == self.recommender.version:
            return False
        loop = asyncio.get_running_loop()
        carry = dict(self._texts)
        try:
            new = await loop.run_in_executor(None, self.load, Path(path), carry)
        except (BadArtifact, OSError, ValueError, KeyError, RuntimeError) as exc:
            self.refused += 1
            log.error("refused model version %s: %s; %s stays live", version, exc, self.recommender.version)
            return False
        # Items added while it loaded (an addition still embedding is added to the new version when it is done).
        self._carry_over(new, {i: t for i, t in self._texts.items() if i not in carry}, embed=False)
        new.set_recommendable(self.hidden, False)
        old, self.recommender = self.recommender, new
        self.swaps += 1
        log.info("swapped model version %s -> %s (%d items, %d of them added live; %d masked)", old.version,
                 new.version, len(new.item_ids) - 1, len(new.item_ids) - new.n_catalogue, new.masked)
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
        items = dict(items)
        self._texts.update(items)
        self.recommender.register_live(items)
        new = [(iid, text) for iid, text in items.items() if iid not in self.recommender.item_code]
        if not new:
            return 0
        text_vecs = await asyncio.get_running_loop().run_in_executor(None, self.embed, [t for _, t in new])
        self._vectors.update(zip([iid for iid, _ in new], text_vecs, strict=True))
        rec = self.recommender  # maybe a new version by now, which may have these items already
        added = [iid for iid, _ in new if iid not in rec.item_code]
        if added:
            rec.add_items(added, rec.online.text_item_vectors(np.stack([self._vectors[i] for i in added])))
        self.items_added += len(added)
        log.info("added %d new items to the live index (now %d)", len(added), len(rec.item_ids) - 1)
        return len(added)

    def change_status(self, changes: dict[str, str | None]) -> None:
        """The last word of each item in a batch of changes: "deleted" or "unavailable" (masked in the index,
        never recommended; events naming it are still applied) or None (recommendable again)."""
        on = [iid for iid, why in changes.items() if why is None and iid in self.hidden]
        off = [iid for iid, why in changes.items() if why]
        if not on and not off:
            return  # additions only
        for iid in on:
            del self.hidden[iid]
        for iid in off:
            self.hidden[iid] = changes[iid]
        rec = self.recommender
        known = rec.set_recommendable(off, False)
        rec.set_recommendable(on, True)
        kinds = list(changes.values())
        log.info("items: %d deleted, %d unavailable (%d of them in the index), %d recommendable again; "
                 "%d masked now", kinds.count("deleted"), kinds.count("unavailable"), known, len(on), rec.masked)

    def item_counts(self) -> dict[str, int]:
        """For /health: items added live, items deleted / unavailable now (the last change of each decides),
        item codes masked in the live index, malformed `items` records skipped."""
        kinds = list(self.hidden.values())
        return {"items_added": self.items_added, "items_removed": kinds.count("deleted"),
                "items_unavailable": kinds.count("unavailable"), "items_masked": self.recommender.masked,
                "items_malformed": self.items_malformed}


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
    """Follow the `items` topic from the beginning (streams/contracts/items.py): additions with a text,
    deletions, availability. Records come in batches of one partition, so every change of an item (keyed by
    its id) comes in order; the last change of each decides."""
    async def handle(records) -> None:
        texts: dict[str, str] = {}
        status: dict[str, str | None] = {}
        for m in records:
            try:
                change = parse_item_change(m.value)
            except BadItemMessage as exc:
                live.items_malformed += 1
                log.error("ignored a malformed item at offset %d of partition %d: %s", m.offset, m.partition, exc)
                continue
            if change.text is not None:
                texts[change.item_id] = change.text
            ok = change.recommendable
            if ok is not None:
                status[change.item_id] = None if ok else "deleted" if change.deleted else "unavailable"
        if texts:  # first, so that an item added and deleted in one batch gets a code (its events apply)
            await live.add_items(list(texts.items()))
        if status:
            live.change_status(status)

    await _consume_all(bootstrap, topic, None, handle, security)
