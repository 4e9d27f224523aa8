"""The Faust app: topics, tables and agents declared in one place, around a `Recommender`.

Agents stay small: parse + dead-letter, then hand a micro-batch per partition to the model object.

Why `in_partition`: Faust's table get/set and its RocksDB store pick the partition from the
*current event*. With `take_events` the current event is the last of the batch, which may belong to
another partition; writes would land in the wrong changelog partition and RocksDB shard. So each
partition's slice of the batch runs with one of its own events made current.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import time
import weakref
from collections import defaultdict

import faust
from faust.streams import _current_event

from streams.artifacts import load_artifact
from streams.config import WorkerSettings, kafka_python_security_from_env
from streams.contracts.events import BadEvent, parse_event
from streams.worker.control import Live, watch_items, watch_versions
from streams.worker.metrics import Metrics
from streams.worker.recommender import Incoming, Recommender
from streams.worker.stall_watch import StallWatch
from streams.worker.table_cache import TableCache

log = logging.getLogger("lsti.worker")


@contextlib.contextmanager
def in_partition(event):
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


def dead_letter(value: bytes | None, key: bytes | None, reason: str, topic: str, partition: int,
                offset: int) -> bytes:
    return json.dumps({
        "reason": reason,
        "original_b64": base64.b64encode(value or b"").decode(),
        "original_key_b64": base64.b64encode(key).decode() if key is not None else None,
        "topic": topic, "partition": partition, "offset": offset, "ts": time.time(),
    }).encode()


def aiokafka_security() -> dict:
    """aiokafka takes the same security keyword names as kafka-python, except the SSL files."""
    sec = kafka_python_security_from_env()
    if "security_protocol" in sec and sec["security_protocol"].endswith("SSL"):
        from aiokafka.helpers import create_ssl_context

        sec["ssl_context"] = create_ssl_context(cafile=sec.pop("ssl_cafile", None),
                                                certfile=sec.pop("ssl_certfile", None),
                                                keyfile=sec.pop("ssl_keyfile", None))
    return sec


def create_app(s: WorkerSettings) -> faust.App:
    artifact = load_artifact(s.artifact, index_threads=1)
    live = Live(Recommender(artifact, k=s.k, max_lateness=s.max_lateness, state_dtype=s.state_dtype), s.k,
                s.max_lateness)
    metrics = Metrics()
    log.info("loaded model %s (%d items, dim %d, index %s)", artifact.version, len(artifact.item_ids) - 1,
             artifact.model.cfg.dim, artifact.index.backend)

    app = faust.App(
        s.app_id,
        broker=f"kafka://{s.bootstrap}",
        store="rocksdb://",
        datadir=str(s.data_dir),
        topic_partitions=s.partitions,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=s.session_timeout,
        broker_heartbeat_interval=s.heartbeat,
        producer_linger_ms=s.producer_linger_ms,
        web_port=s.web_port,
        web_bind=s.web_bind,
        web_host=s.web_bind,
        table_standby_replicas=0,
        processing_guarantee=s.processing_guarantee,
        # A rebalance need not wait for the agent to drain its micro-batch (failover got faster: 20-24 s vs
        # 28-38 s for the test). Events handed out before it may be seen again; the offset dedupe skips them.
        # Under heavy CPU load a surviving worker was seen to stop consuming after a failover, with and
        # without this setting: the stall watch below (streams/worker/stall_watch.py) detects and repairs that.
        stream_wait_empty=False,
        **s.security,
    )
    raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    events = app.topic(s.topics.events, partitions=s.partitions, **raw)
    recommendations = app.topic(s.topics.recommendations, partitions=s.partitions, **raw)
    dlq = app.topic(s.topics.dlq, partitions=1, **raw)
    long_term_topic = app.topic(s.topics.long_term, partitions=s.partitions, **raw)
    short_term = app.Table("short-term", partitions=s.partitions, key_type=bytes, value_type=bytes)
    long_term = app.Table("long-term", partitions=s.partitions, key_type=bytes, value_type=bytes)
    cache_keys = 200_000 if s.cache_tables else 0
    short_cache, long_cache = TableCache(short_term, cache_keys), TableCache(long_term, cache_keys)

    async def forget_cached_states(sender, partitions, **kwargs):
        """Any rebalance: partitions may move, so no cached read survives it."""
        short_cache.clear()
        long_cache.clear()

    app.on_partitions_revoked.connect(forget_cached_states)
    app.on_partitions_assigned.connect(forget_cached_states)

    @app.agent(long_term_topic)
    async def store_long_term(stream):
        """Nightly long-term vectors arrive keyed by user, co-partitioned with `events`."""
        async for event in stream.events():
            if event.key is not None and event.value is not None:
                long_cache[event.key] = event.value
                metrics.long_term_loaded += 1

    @app.agent(events)
    async def recommend(stream):
        async for batch in stream.take_events(s.batch_max, within=s.batch_within):
            started = time.perf_counter()
            stall.batch_started = time.monotonic()
            recommender = live.recommender  # one model version per micro-batch; swaps happen in between
            metrics.consumed += len(batch)
            by_partition: dict[int, list] = defaultdict(list)
            seen: dict[int, int] = {}
            for ev in batch:
                msg = ev.message
                seen[msg.partition] = msg.offset
                try:
                    parsed = parse_event(ev.value, ev.key)
                except BadEvent as exc:
                    await dlq.send(value=dead_letter(ev.value, ev.key, str(exc), msg.topic, msg.partition,
                                                     msg.offset))
                    metrics.dead_lettered += 1
                    continue
                by_partition[msg.partition].append(
                    (ev, Incoming(parsed, msg.partition, msg.offset, ev.value, ev.key)))
            for group in by_partition.values():
                with in_partition(group[-1][0]):
                    incs = [inc for _, inc in group]
                    users = {inc.event.user_id for inc in incs}
                    states = {u: short_cache.get(u.encode()) for u in users}
                    longs = {u: long_cache.get(u.encode()) for u in users}
                    res = recommender.process(incs, states, longs)
                    # Outputs first, then state: a crash in between re-applies nothing (the state still has
                    # the old offset, so the events run again from the same state) and at worst repeats
                    # a recommendation; the state itself is applied exactly once per event.
                    # The transport-level send: no per-record FutureMessage/serializer layer of Topic.send;
                    # Faust still flushes this producer before it commits consumer offsets.
                    part = group[0][1].partition
                    for u, out in res.outputs:
                        await app.producer.send(recommendations.get_topic_name(), u.encode(), out, part, None, None)
                    for inc, reason in res.dead:
                        await dlq.send(value=dead_letter(inc.raw, inc.key, reason, s.topics.events, inc.partition,
                                                         inc.offset))
                    for u, value in res.states.items():
                        short_cache[u.encode()] = value
                metrics.applied += res.applied
                metrics.duplicates += res.duplicates
                metrics.dead_lettered += len(res.dead)
                metrics.resets += res.resets
            metrics.observe_batch(batch, time.perf_counter() - started)
            stall.saw(seen)
            stall.batch_started = None
            if s.fault_stop_fetch_after and metrics.consumed >= s.fault_stop_fetch_after and not stall.fault_done:
                stall.inject_stop_fetch(app)

    stall = StallWatch(s.topics.events, stall_after=s.stall_after)

    @app.timer(interval=5.0)
    async def report():
        metrics.log_progress(log)
        if s.stall_after > 0 and await stall.check(app, unstick=s.unstick_stalls):
            metrics.stalls += 1

    @app.task
    async def follow_model_versions():
        await watch_versions(live, s.bootstrap, s.topics.model_versions, aiokafka_security())

    @app.task
    async def follow_new_items():
        await watch_items(live, s.bootstrap, s.topics.items, aiokafka_security())

    @app.page("/health")
    async def health(web, request):
        return web.json({"status": "ok", "model_version": live.recommender.version, "swaps": live.swaps,
                         "refused_versions": live.refused, "items_added": live.items_added,
                         "items": len(live.recommender.item_ids) - 1, **metrics.counts(),
                         "table_cache": {"short_hits": short_cache.hits, "short_misses": short_cache.misses,
                                         "long_hits": long_cache.hits, "long_misses": long_cache.misses,
                                         "long_cached": len(long_cache)}})

    def lag() -> dict[int, int]:
        """Events not yet read per assigned partition of `events` (log end - read offset, Faust's monitor)."""
        mon = app.monitor
        return {tp.partition: max(0, int(end) - int(mon.tp_read_offsets.get(tp, -1)) - 1)
                for tp, end in mon.tp_end_offsets.items() if tp.topic == s.topics.events}

    @app.page("/metrics")
    async def prometheus(web, request):
        lines = ["# HELP lsti_consumer_lag Events behind the log end, per partition of the events topic",
                 "# TYPE lsti_consumer_lag gauge"]
        lines += [f'lsti_consumer_lag{{partition="{p}"}} {n}' for p, n in sorted(lag().items())]
        return web.text(metrics.prometheus() + "\n".join(lines) + "\n", content_type="text/plain")

    app.lsti_metrics = metrics  # type: ignore[attr-defined]
    return app
