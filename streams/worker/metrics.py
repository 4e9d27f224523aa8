"""Worker counters and an event-to-output latency histogram, as JSON and Prometheus text.

Invariant the tests check: consumed = applied + duplicates + dead_lettered. Counters are per process
(`counted_since` on /health): a restarted worker counts from zero; the durable totals are the topics.
"""

from __future__ import annotations

import gc
import logging
import time

import numpy as np

BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, float("inf"))


class Metrics:
    def __init__(self) -> None:
        self.consumed = 0
        self.applied = 0
        self.duplicates = 0
        self.dead_lettered = 0
        self.resets = 0
        self.long_term_loaded = 0
        self.batches = 0
        self.model_passes = 0  # one per fetch group: the batches of all partitions of a fetch together
        self.rereads = 0  # partitions read again because a batch followed records fetched but not applied
        self.http_requests = 0  # on-demand recommendations answered by this worker
        self.forgotten = 0  # users whose states were deleted on request
        self.stalls = 0  # times the stall watch found events waiting and none consumed
        self.busy_seconds = 0.0  # in the agent, per batch: parse, model, sends and their delivery, state write
        self.wait_seconds = 0.0  # of which waiting for Kafka to confirm answers and state records
        self.parse_seconds = 0.0  # parsing and validating events
        self.model_seconds = 0.0  # in the model (`Recommender.process`): admission, LSTM, search, answers
        self.held_seconds = 0.0  # the agent held back: a partition's earlier batches still being delivered
        self.starved_seconds = 0.0  # the agent waiting for its next batch (nothing fetched yet)
        self.hist = np.zeros(len(BUCKETS_MS), np.int64)
        self.lag_ms_sum = 0.0
        # Where that latency accrues, summed over events: until the consumer handed the event's batch out
        # (publish, broker, fetch), and from there until the agent took the batch (Faust's queues).
        self.fetched_ms_sum = 0.0
        self.queued_ms_sum = 0.0
        self.gc_seconds = 0.0  # the interpreter stopped for its cyclic garbage collector (`watch_gc`)
        self.gc_max_seconds = 0.0  # the longest of those pauses since the last progress line
        self.gc_full = 0  # of those collections, the full ones (generation 2)
        self.started = time.time()
        self._last_report = self._snapshot()

    def watch_gc(self) -> None:
        """Time every collection of Python's cyclic garbage collector: a full collection of a heap holding
        torch, numpy and Faust stops every thread of the worker at once (the GIL), events included."""
        started: list[float] = []

        def clock(phase: str, info: dict) -> None:
            if phase == "start":
                started.append(time.perf_counter())
            elif started:
                pause = time.perf_counter() - started.pop()
                self.gc_seconds += pause
                self.gc_max_seconds = max(self.gc_max_seconds, pause)
                self.gc_full += info.get("generation") == 2

        gc.callbacks.append(clock)

    def observe_batch(self, timestamps_ms: list, seconds: float, fetched_at: float | None = None,
                      picked_at: float | None = None) -> None:
        """Count a batch; latency = now - broker append time of each message (`timestamps_ms`); with the times
        (epoch s) the consumer handed the batch out and the agent took it, the parts of it before each."""
        self.batches += 1
        self.busy_seconds += seconds
        if timestamps_ms:
            ts = np.asarray(timestamps_ms, np.float64)
            lat = time.time() * 1000.0 - ts
            self.hist += np.bincount(np.searchsorted(BUCKETS_MS, lat), minlength=len(BUCKETS_MS))[: len(BUCKETS_MS)]
            self.lag_ms_sum += float(lat.sum())
            if fetched_at is not None and picked_at is not None:
                self.fetched_ms_sum += fetched_at * 1000.0 * len(ts) - float(ts.sum())
                self.queued_ms_sum += (picked_at - fetched_at) * 1000.0 * len(ts)

    def counts(self) -> dict:
        return {"consumed": self.consumed, "applied": self.applied, "duplicates": self.duplicates,
                "dead_lettered": self.dead_lettered, "state_resets": self.resets, "batches": self.batches,
                "model_passes": self.model_passes,
                "long_term_loaded": self.long_term_loaded, "stalls": self.stalls, "rereads": self.rereads,
                "http_requests": self.http_requests, "forgotten": self.forgotten,
                "busy_seconds": round(self.busy_seconds, 3),
                "wait_seconds": round(self.wait_seconds, 3), "parse_seconds": round(self.parse_seconds, 3),
                "model_seconds": round(self.model_seconds, 3), "held_seconds": round(self.held_seconds, 3),
                "starved_seconds": round(self.starved_seconds, 3), "gc_seconds": round(self.gc_seconds, 3),
                "gc_full_collections": self.gc_full, "counted_since": self.started}

    def _snapshot(self) -> tuple:
        """What a progress line compares with the last one: (time, consumed, model passes, CPU time, parse, model,
        held and starved seconds, latency sum and count, its fetched and queued parts, garbage collection)."""
        return (time.time(), self.consumed, self.model_passes, time.process_time(), self.parse_seconds,
                self.model_seconds, self.held_seconds, self.starved_seconds, self.lag_ms_sum, int(self.hist.sum()),
                self.fetched_ms_sum, self.queued_ms_sum, self.gc_seconds)

    def log_progress(self, log: logging.Logger) -> None:
        """Since the last line: events/s, the process's CPU use (all threads; 100% = one core), the
        microseconds per event spent parsing and in the model, and the shares of the time the agent was held
        back by deliveries in flight or starved of records: a slow worker says where its time went."""
        old, self._last_report = self._last_report, self._snapshot()
        deltas = (b - a for a, b in zip(old, self._last_report, strict=True))
        span, events, passes, cpu, parse, model, held, starved, lag, lags, fetched, queued, gcs = deltas
        gc_max, self.gc_max_seconds = self.gc_max_seconds, 0.0
        if events:
            per, span = 1e6 / events, max(1e-9, span)
            log.info("consumed %d (%.0f/s) applied %d duplicates %d dead-lettered %d in %d batches (%.0f events per "
                     "model pass); cpu %.0f%%, parse %.1f us/event, model %.1f us/event, held %.0f%%, starved %.0f%%; "
                     "events %.0f ms old when applied (%.0f when fetched, %.0f more queued); gc %.0f ms (longest %.0f)",
                     self.consumed, events / span, self.applied, self.duplicates, self.dead_lettered, self.batches,
                     events / max(1, passes),
                     100.0 * cpu / span, parse * per, model * per, 100.0 * held / span, 100.0 * starved / span,
                     lag / max(1, lags), fetched / max(1, lags), queued / max(1, lags), gcs * 1e3, gc_max * 1e3)

    def prometheus(self) -> str:
        lines = []
        for name, help_, value in (
            ("lsti_events_consumed_total", "Events read from the events topic", self.consumed),
            ("lsti_events_applied_total", "Events applied to user state (one recommendation each)", self.applied),
            ("lsti_events_duplicate_total", "Events skipped as already applied", self.duplicates),
            ("lsti_events_dead_lettered_total", "Events sent to the dead-letter topic", self.dead_lettered),
            ("lsti_state_resets_total", "User states reset after a model change", self.resets),
            ("lsti_consumer_stalls_total", "Times events waited on an assigned partition and none was consumed",
             self.stalls),
        ):
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter", f"{name} {value}"]
        lines += ["# HELP lsti_event_latency_ms Broker append to recommendation sent",
                  "# TYPE lsti_event_latency_ms histogram"]
        cum = np.cumsum(self.hist)
        for b, c in zip(BUCKETS_MS, cum, strict=True):
            le = "+Inf" if b == float("inf") else f"{b:g}"
            lines.append(f'lsti_event_latency_ms_bucket{{le="{le}"}} {int(c)}')
        lines += [f"lsti_event_latency_ms_sum {self.lag_ms_sum:.1f}", f"lsti_event_latency_ms_count {int(cum[-1])}"]
        return "\n".join(lines) + "\n"
