"""The Faust app: topics, tables and agents declared in one place, around a `Recommender`.

Records reach the agents through the batch path (`streams/worker/batches.py`): one Faust event per
fetched partition batch, taken by the events agent in the groups of their fetch. Per group the agent
parses every record (a bad one is dead-lettered alone) and runs the model once; per batch it sends the
answers and dead letters as record batches and waits for them, then writes the users' states
(`streams/worker/state_store.py`: changelog, then RocksDB), and only then acks the batch's offset
range. So a state that holds an event implies its answer was delivered, and an exception anywhere
leaves the batch un-acked: nothing is committed past it, and the worker stops (exit code 70)
so that a restart reads the batch again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sys
import time

import faust
from faust.types import TP

from streams.artifacts import load_artifact
from streams.config import WorkerSettings, kafka_python_security_from_env
from streams.contracts.dead_letter import dead_letter
from streams.contracts.events import BadEvent, parse_event
from streams.worker.batches import BatchApp, BatchMessage, ack_batch, fetch_groups, send_records
from streams.worker.control import Live, watch_items, watch_versions
from streams.worker.finishes import Finishes, drop_written
from streams.worker.lanes import Lanes
from streams.worker.metrics import Metrics
from streams.worker.recommender import BatchResult, Incoming, Recommender
from streams.worker.stall_watch import StallWatch
from streams.worker.state_store import BatchedTable, FencedTable, event_offset

log = logging.getLogger("lsti.worker")
EXIT_BATCH_FAILED = 70


def aiokafka_security() -> dict:
    """aiokafka takes the same security keyword names as kafka-python, except the SSL files."""
    sec = kafka_python_security_from_env()
    if "security_protocol" in sec and sec["security_protocol"].endswith("SSL"):
        from aiokafka.helpers import create_ssl_context

        sec["ssl_context"] = create_ssl_context(cafile=sec.pop("ssl_cafile", None),
                                                certfile=sec.pop("ssl_certfile", None),
                                                keyfile=sec.pop("ssl_keyfile", None))
    return sec


def parse_records(records: list) -> tuple[list[Incoming], list[tuple[object, str]]]:
    """Every record either parses or gets its reason; nothing a record holds can raise past here."""
    good, bad = [], []
    now = time.time()  # one clock read per batch: "in the future" is judged against the batch's arrival
    for r in records:
        try:
            good.append(Incoming(parse_event(r.value, r.key, now), r.partition, r.offset, r.value, r.key))
        except BadEvent as exc:
            bad.append((r, str(exc)))
        except Exception as exc:  # the parser is total (tests/test_contracts.py); this is the last fence
            bad.append((r, f"unparseable event ({type(exc).__name__})"))
    return good, bad


def apply_isolated(recommender: Recommender, incs: list[Incoming], states: dict, longs: dict) -> BatchResult:
    """The whole batch in one model pass; if that raises, event by event, so one event cannot sink another."""
    try:
        return recommender.process(incs, states, longs)
    except Exception:
        log.exception("model pass failed on a batch of %d events; applying them one at a time", len(incs))
    res = BatchResult()
    states = dict(states)
    for inc in incs:
        try:
            one = recommender.process([inc], states, longs)
        except Exception as exc:
            res.dead.append((inc, f"event could not be applied ({type(exc).__name__}: {exc})"[:300]))
            continue
        states.update(one.states)
        res.states.update(one.states)
        res.outputs += one.outputs
        res.dead += one.dead
        res.applied += one.applied
        res.duplicates += one.duplicates
        res.resets += one.resets
    return res


def run_model(recommender: Recommender, batches: list[list[Incoming]], states: list[dict],
              longs: list[dict]) -> list[BatchResult]:
    """One model pass for all the batches of a fetch when no user is in two of them (the usual case: events
    are keyed by user), else one per batch; the result split back per batch."""
    users = [u for st in states for u in st]
    if len(batches) == 1 or not users or len(set(users)) != len(users):
        return [apply_isolated(recommender, incs, st, lg) if incs else BatchResult()
                for incs, st, lg in zip(batches, states, longs, strict=True)]
    merged_states, merged_longs = {}, {}
    for st, lg in zip(states, longs, strict=True):
        merged_states.update(st)
        merged_longs.update(lg)
    whole = apply_isolated(recommender, [inc for incs in batches for inc in incs], merged_states, merged_longs)
    parts = [BatchResult() for _ in batches]
    of_user = {u: i for i, st in enumerate(states) for u in st}
    for u, out in whole.outputs:
        parts[of_user[u]].outputs.append((u, out))
    for u, v in whole.states.items():
        parts[of_user[u]].states[u] = v
    for inc, reason in whole.dead:
        parts[of_user[inc.event.user_id]].dead.append((inc, reason))
    # Counted per batch, so that a batch left out later (a rebalance) takes its counts with it: every applied
    # event has one answer, and what is neither answered nor dead-lettered was a redelivery.
    for part, incs in zip(parts, batches, strict=True):
        part.applied = len(part.outputs)
        part.duplicates = len(incs) - part.applied - len(part.dead)
    parts[0].resets = whole.resets  # users' states reset by a model change: no per-batch split needed
    return parts


def create_app(s: WorkerSettings) -> faust.App:
    if s.processing_guarantee != "at_least_once":
        raise SystemExit(f"error: processing guarantee {s.processing_guarantee!r} is not supported; the worker "
                         "runs at_least_once with state applied exactly once (README, Delivery)")
    artifact = load_artifact(s.artifact, index_threads=1)
    live = Live(Recommender(artifact, k=s.k, max_lateness=s.max_lateness, state_dtype=s.state_dtype,
                            explain=s.explain), s.k,
                s.max_lateness)
    metrics = Metrics()
    metrics.watch_gc()
    log.info("loaded model %s (%d items, dim %d, index %s)", artifact.version, len(artifact.item_ids) - 1,
             artifact.model.cfg.dim, artifact.index.backend)

    app = BatchApp(
        s.app_id,
        broker=f"kafka://{s.bootstrap}",
        store="rocksdb://",
        datadir=str(s.data_dir),
        topic_partitions=s.partitions,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=s.session_timeout,
        broker_heartbeat_interval=s.heartbeat,
        broker_max_poll_records=s.batch_max,
        producer_linger_ms=s.producer_linger_ms,
        producer_max_batch_size=512 * 1024,
        # Each queued message is a whole fetched batch: the queue bounds memory and hands backpressure to
        # Faust's buffer-full pause of the partition; long enough that the agent rarely waits for a fetch.
        stream_buffer_maxsize=s.stream_buffer,
        web_port=s.web_port,
        web_bind=s.web_bind,
        web_host=s.web_bind,
        canonical_url=s.canonical_url,
        table_standby_replicas=0,
        # A rebalance need not wait for the agent to drain its batch: batches of an older generation
        # are dropped un-acked, and the per-user offsets skip events read twice.
        stream_wait_empty=False,
        **s.security,
    )
    app.batch_topics = frozenset({s.topics.events, s.topics.long_term, s.topics.forget})
    raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    events = app.topic(s.topics.events, partitions=s.partitions, **raw)
    long_term_topic = app.topic(s.topics.long_term, partitions=s.partitions, **raw)
    forget_topic = app.topic(s.topics.forget, partitions=s.partitions, **raw)
    table_args = dict(partitions=s.partitions, key_type=bytes, value_type=bytes, beacon=app.tables.beacon)
    short_table = app.tables.add(FencedTable(app, name="short-term", merge_by_offset=True, **table_args))
    long_table = app.tables.add(FencedTable(app, name="long-term", **table_args))
    security = aiokafka_security()
    short = BatchedTable(app, short_table, security, s.bootstrap)
    long = BatchedTable(app, long_table, security, s.bootstrap)
    stall = StallWatch(s.topics.events, stall_after=s.stall_after)
    recs_topic, dlq_topic = s.topics.recommendations, s.topics.dlq

    async def forget_changelog_ends(sender, partitions, **kwargs):
        """Any rebalance: a partition may have had another writer meanwhile; re-read its end after recovery."""
        short.forget_partitions()
        long.forget_partitions()

    app.on_partitions_revoked.connect(forget_changelog_ends)

    event_lanes, long_term_lanes, forget_lanes = Lanes("events"), Lanes("long-term"), Lanes("forget")
    app.fault_drop_fetched_after = s.fault_drop_fetched_after or None  # tests: BatchConsumer drops one run
    skip_fault = {"after": s.fault_skip_batch_after}

    @app.agent(long_term_topic)
    async def store_long_term(stream):
        """Nightly long-term vectors arrive keyed by user, co-partitioned with `events`."""
        async for event in stream.noack().events():
            msg: BatchMessage = event.message
            start = await long_term_lanes.admit(msg, app.consumer, app.consumer_generation_id)
            if start is None:
                continue
            vectors = {r.key: r.value for r in msg.records if r.key is not None and r.value is not None}
            await long.put_many(msg.partition, vectors)
            long_term_lanes.applied(msg)
            metrics.long_term_loaded += len(vectors)
            await ack_batch(event, start)

    # Per partition: held by the events agent from reading states to scheduling their write, and by a
    # forget while it waits for the writes in flight and writes its tombstones, so no state computed
    # before a forget can land after it.
    partition_locks: dict[int, asyncio.Lock] = {}

    @app.agent(forget_topic)
    async def forget_users(stream):
        """Privacy: delete users' short-term states and long-term vectors (tombstones in both changelogs,
        which compaction then drops); a later event of the user starts a fresh state."""
        async for event in stream.noack().events():
            msg: BatchMessage = event.message
            start = await forget_lanes.admit(msg, app.consumer, app.consumer_generation_id)
            if start is None:
                continue
            keys = {r.key for r in msg.records if r.key}
            async with partition_locks.setdefault(msg.partition, asyncio.Lock()):
                prev = finishing.last(msg.partition)
                if prev is not None:
                    await asyncio.shield(prev)
                overlay = pending.get(msg.partition, {})
                for key in keys:
                    overlay.pop(key, None)
                tombstones = dict.fromkeys(keys)
                await short.put_many(msg.partition, tombstones)
                await long.put_many(msg.partition, tombstones)
            forget_lanes.applied(msg)
            metrics.forgotten += len(keys)
            log.info("forgot %d users on partition %d", len(keys), msg.partition)
            await ack_batch(event, start)

    # Per partition, the states computed but not yet in RocksDB (their batch's answers are on the way): the
    # next batch of the partition reads them from here, so its model step overlaps the previous delivery.
    pending: dict[int, dict[bytes, bytes]] = {}
    finishing = Finishes()  # per partition, the batches' finishes, chained in order

    def stop_worker(msgs: list[BatchMessage]) -> None:
        # Not acked, so never committed; stop rather than go on past it (a restart reads it again).
        ranges = ", ".join(f"{m.topic}[{m.partition}] offsets {m.first}..{m.offset}" for m in msgs)
        log.critical("batch %s failed; stopping the worker (exit %d) so that it is read again", ranges,
                     EXIT_BATCH_FAILED, exc_info=True)
        sys.stdout.flush()
        os._exit(EXIT_BATCH_FAILED)

    async def finish(event, start: int, sent: list, states: dict[bytes, bytes], prev: asyncio.Task | None) -> None:
        """Answers delivered, then the states that say so written, then the offsets acked; in batch order."""
        msg: BatchMessage = event.message
        try:
            if prev is not None:
                await prev
            t0 = time.perf_counter()
            for fut, _n in sent:
                await fut
            await short.put_many(msg.partition, states)
            metrics.wait_seconds += time.perf_counter() - t0
            drop_written(pending.get(msg.partition, {}), states)
            await ack_batch(event, start)
        except Exception:
            stop_worker([msg])

    async def admit(events: list) -> list[tuple]:
        """The batches the lanes let through, with the offset each is applied from."""
        admitted = []
        for event in events:
            msg: BatchMessage = event.message
            if skip_fault["after"] and metrics.consumed >= skip_fault["after"]:
                skip_fault["after"] = 0  # tests: lose one delivered batch the way Faust's stream skips one
                log.warning("fault injection: skipping batch %s[%d] %d..%d", msg.topic, msg.partition, msg.first,
                            msg.offset)
                continue
            start = await event_lanes.admit(msg, app.consumer, app.consumer_generation_id)
            metrics.rereads = event_lanes.rereads
            if start is not None:
                admitted.append((event, start))
        return admitted

    def read_states(part: int, incs: list[Incoming]) -> tuple[dict, dict]:
        """The users' short-term states and long-term vectors, the pending overlay before RocksDB."""
        users = list(dict.fromkeys(inc.event.user_id for inc in incs))
        if not users:
            return {}, {}
        keys = [u.encode() for u in users]
        overlay = pending.setdefault(part, {})
        stored = short.get_many(part, keys)
        # The newer of the two (a recovery after a rebalance may have brought a newer one than ours in flight).
        states = {u: max(overlay.get(k), v, key=event_offset) for u, k, v in zip(users, keys, stored, strict=True)}
        return states, dict(zip(users, long.get_many(part, keys), strict=True))

    async def apply_group(events: list) -> None:
        """The batches of one fetch (`fetch_groups`): parse, one model pass, then per partition its sends;
        each batch's finish runs while the next group is computed."""
        started, picked_at = time.perf_counter(), time.time()
        admitted = await admit(events)
        if not admitted:
            return
        recommender = live.recommender  # one model version per group; swaps happen in between
        t0 = time.perf_counter()
        parsed = [parse_records(event.message.records) for event, _ in admitted]
        t1 = time.perf_counter()
        read = [read_states(event.message.partition, incs)
                for (event, _), (incs, _) in zip(admitted, parsed, strict=True)]
        t2 = time.perf_counter()
        results = run_model(recommender, [incs for incs, _ in parsed], [st for st, _ in read],
                            [lg for _, lg in read])
        metrics.parse_seconds += t1 - t0
        metrics.model_seconds += time.perf_counter() - t2
        metrics.model_passes += 1
        seconds = (time.perf_counter() - started) / len(admitted)
        for (event, start), (_, bad), res in zip(admitted, parsed, results, strict=True):
            msg: BatchMessage = event.message
            if msg.generation_id != app.consumer_generation_id:
                return  # a rebalance happened meanwhile: the partitions' new owners apply these events
            part, records = msg.partition, msg.records
            event_lanes.applied(msg)
            dead = [(r.value, r.key, reason, r.offset) for r, reason in bad]
            dead += [(inc.raw, inc.key, reason, inc.offset) for inc, reason in res.dead]
            sent = await send_records(app, recs_topic, part, [(u.encode(), out) for u, out in res.outputs])
            sent += await send_records(app, dlq_topic, 0, [(None, dead_letter(v, k, why, msg.topic, part, off))
                                                           for v, k, why, off in dead])
            new_states = {u.encode(): v for u, v in res.states.items()}
            pending.setdefault(part, {}).update(new_states)
            # backpressure: a bounded number of a partition's batches in flight
            metrics.held_seconds += await finishing.submit(part, functools.partial(finish, event, start, sent,
                                                                                   new_states))
            metrics.consumed += len(records)
            metrics.applied += res.applied
            metrics.duplicates += res.duplicates
            metrics.dead_lettered += len(dead)
            metrics.resets += res.resets
            metrics.observe_batch([r.timestamp for r in records if r.timestamp is not None], seconds, msg.fetched_at,
                                  picked_at)
            stall.saw({part: records[-1].offset})

    @app.agent(events)
    async def recommend(stream):
        idle_since = time.perf_counter()
        async for group in fetch_groups(stream.noack().events()):
            metrics.starved_seconds += time.perf_counter() - idle_since
            stall.batch_started = time.monotonic()
            try:
                async with contextlib.AsyncExitStack() as locks:  # in partition order: no two holders deadlock
                    for part in sorted({event.message.partition for event in group}):
                        await locks.enter_async_context(partition_locks.setdefault(part, asyncio.Lock()))
                    await apply_group(group)
            except Exception:
                stop_worker([event.message for event in group])
            stall.batch_started = None
            idle_since = time.perf_counter()
            if s.fault_stop_fetch_after and metrics.consumed >= s.fault_stop_fetch_after and not stall.fault_done:
                stall.inject_stop_fetch(app)

    @app.timer(interval=5.0)
    async def report():
        """Progress line, stall watch, changelog fence check. A failure here (a broker away) waits for the next tick:
        a timer that raises would crash the worker."""
        metrics.log_progress(log)
        try:
            if s.stall_after > 0 and await stall.check(app, unstick=s.unstick_stalls):
                metrics.stalls += 1
            if not app.rebalancing and app.tables.recovery.completed.is_set():
                await short.check_foreign()
        except Exception as exc:
            log.warning("periodic check failed (%s: %s); retrying in 5 s", type(exc).__name__, exc)

    @app.task
    async def follow_model_versions():
        await watch_versions(live, s.bootstrap, s.topics.model_versions, security)

    @app.task
    async def follow_new_items():
        await watch_items(live, s.bootstrap, s.topics.items, security)

    @app.page("/health")
    async def health(web, request):
        owned = sorted(tp.partition for tp in app.consumer.assignment() if tp.topic == s.topics.events)
        return web.json({"status": "ok", "model_version": live.recommender.version, "partitions": owned,
                         "swaps": live.swaps,
                         "refused_versions": live.refused, **live.item_counts(),
                         "items": len(live.recommender.item_ids) - 1, **metrics.counts(),
                         "changelog": {"foreign_records": short.foreign_records, "reasserted": short.reasserted}})

    @app.page("/users/{user_id}/recommendations")
    @app.table_route(table=short_table, match_info="user_id")
    async def user_recommendations(web, request, user_id: str):
        """A user's current top-k without a new event, from whichever worker is asked: Faust routes the
        request to the owner of the user's partition; the owner answers from its RocksDB copy."""
        try:
            k = int(request.query.get("k", s.k))
            at = float(request.query["at"]) if "at" in request.query else None
            explain = request.query.get("explain", "0") not in ("0", "false", "no", "")
        except ValueError:
            return web.json({"error": "k must be an integer and at a number (epoch seconds)"}, status=400)
        if not 1 <= k <= 100:
            return web.json({"error": "k must be between 1 and 100"}, status=400)
        key = user_id.encode()
        part = app.producer.key_partition(short_table.changelog_topic.get_topic_name(), key).partition
        if app.rebalancing or not app.tables.recovery.completed.is_set() \
                or not app.assignor.is_active(TP(short_table.changelog_topic.get_topic_name(), part)):
            return web.json({"error": "the user's partition is moving between workers; retry shortly"}, status=503,
                            headers={"Retry-After": "1"})
        overlay = pending.get(part, {})
        [stored], [vec] = short.get_many(part, [key]), long.get_many(part, [key])
        state = max(overlay.get(key), stored, key=event_offset)
        answer = live.recommender.recommend_user(user_id, state, vec, k=k, now=at, explain=explain)
        metrics.http_requests += 1
        return web.json(answer)

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
