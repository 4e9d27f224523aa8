"""`lsti archive`: the events topic to date-partitioned Parquet files, so the nightly step reads what the
stream saw (`lsti nightly --archive DIR`) and a deployment needs nothing outside LSTI to refresh nightly.

    DIR/date=YYYY-MM-DD/part-<partition>-<first offset>.parquet
        user_id, item_id, event_type (strings), ts (float64 epoch seconds), event_id (string),
        partition (int32), offset (int64)

The date is the event's (`ts`, UTC). Each record goes through the worker's parser
(streams.contracts.events.parse_event); a record it refuses is skipped and counted (the worker dead-letters
it already). The archive is its own consumer group (default `lsti-archive`) on the `events` topic, so it
never takes partitions from the workers, and several archive processes split the partitions.

Delivery: records of a partition are buffered; a flush writes them (one file per event date in the
buffer, usually one) to a temp name, fsyncs, renames into place and fsyncs the folder, and only then
commits the partition's offset past them. A crash re-reads from the last commit, so it loses nothing and
re-writes at most the one flush it was in: under the same names (a re-write starting at the same offset
replaces the file) or, when its boundaries differ, in files that repeat some offsets, which
`read_archive` (encoders/data.py) counts once by (partition, offset). A partition taken away in a
rebalance drops its buffer (neither written nor committed): its next owner reads it again from the last
commit. Temp files (dot names) are never read; those left by a crash are removed after an hour.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from encoders.data import ARCHIVE_COLUMNS, archive_files, read_archive
from streams.config import Topics, kafka_python_security_from_env
from streams.contracts.events import BadEvent, parse_event

log = logging.getLogger("lsti.archive")

DEFAULT_GROUP = "lsti-archive"
FILE_EVENTS = 100_000  # events per file at most (a partition's buffer is flushed when it holds this many)
FLUSH_SECONDS = 60.0  # ... or when its oldest record waited this long
STALE_TEMP_SECONDS = 3600.0

__all__ = ["Archiver", "ArchiveStats", "run_archive", "read_archive", "archive_files", "ARCHIVE_COLUMNS",
           "main_archive"]


def _schema():
    import pyarrow as pa

    return pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("event_type", pa.string()),
                      ("ts", pa.float64()), ("event_id", pa.string()), ("partition", pa.int32()),
                      ("offset", pa.int64())])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class ArchiveStats:
    """What a run did: records read, events written, bad records skipped, files written, commits."""

    records: int = 0
    events: int = 0
    bad: int = 0
    files: int = 0
    commits: int = 0
    commit_failures: int = 0
    partitions: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        return (f"archive: {self.events:,} events in {self.files:,} files, {self.bad:,} bad records skipped "
                f"(of {self.records:,} read), {self.commits:,} commits in {self.seconds:.1f}s")


class _Buffer:
    """One partition's records since its last flush: columns, and the offset to commit after them."""

    def __init__(self, first_offset: int):
        self.first_offset = first_offset
        self.next_offset = first_offset
        self.started = time.monotonic()
        self.cols: dict[str, list] = {name: [] for name in ARCHIVE_COLUMNS}
        self.days: list[str] = []

    def __len__(self) -> int:
        return len(self.days)


class Archiver:
    """The sink: `run()` consumes until stopped (or idle), writing and committing as described above.

    `after_write(paths)` (tests) is called after a flush's files are in place and before its commit: a crash
    there is the case a restart must re-write."""

    def __init__(self, bootstrap: str, out: Path, topic: str = "events", group: str = DEFAULT_GROUP,
                 file_events: int = FILE_EVENTS, flush_seconds: float = FLUSH_SECONDS,
                 session_timeout: float | None = None, after_write=None):
        self.bootstrap = bootstrap
        self.out = Path(out)
        self.topic = topic
        self.group = group
        self.file_events = max(1, int(file_events))
        self.flush_seconds = float(flush_seconds)
        self.session_timeout = float(session_timeout if session_timeout is not None
                                     else os.environ.get("LSTI_SESSION_TIMEOUT", 10.0))
        self.after_write = after_write
        self.stats = ArchiveStats()
        self.buffers: dict[int, _Buffer] = {}
        self.consumer = None
        self._revoked: set[int] = set()
        self._days: dict[int, str] = {}
        self._tag = f"{socket.gethostname()}.{os.getpid()}"

    # -- files ---------------------------------------------------------------------------------------------
    def _day(self, ts: float) -> str:
        n = int(ts // 86400)
        day = self._days.get(n)
        if day is None:
            day = self._days[n] = datetime.fromtimestamp(n * 86400, UTC).strftime("%Y-%m-%d")
        return day

    def _remove_stale_temps(self) -> None:
        """Temp files of crashed runs (another live archive's are younger than an hour: left alone)."""
        now = time.time()
        for p in self.out.glob("date=*/.part-*"):
            try:
                if now - p.stat().st_mtime > STALE_TEMP_SECONDS:
                    p.unlink()
                    log.info("removed a stale temp file %s", p)
            except OSError:
                pass

    def _write(self, partition: int, buf: _Buffer) -> list[Path]:
        """The buffer's events as one file per date, each fsynced and renamed into place."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        by_day: dict[str, list[int]] = {}
        for j, day in enumerate(buf.days):
            by_day.setdefault(day, []).append(j)
        schema = _schema()
        paths = []
        for day, rows in by_day.items():
            first = buf.cols["offset"][rows[0]]
            folder = self.out / f"date={day}"
            folder.mkdir(parents=True, exist_ok=True)
            final = folder / f"part-{partition}-{first}.parquet"
            tmp = folder / f".{final.name}.{self._tag}.tmp"
            table = pa.table({name: [buf.cols[name][j] for j in rows] for name in ARCHIVE_COLUMNS}, schema=schema)
            with open(tmp, "wb") as f:
                pq.write_table(table, f, compression="zstd")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(folder)
            paths.append(final)
            log.info("wrote %s: %d events of partition %d (offsets %d..%d)", final.relative_to(self.out),
                     len(rows), partition, first, buf.cols["offset"][rows[-1]])
        return paths

    def flush(self, partition: int) -> None:
        """Write the partition's buffer, then commit its offset past it."""
        from kafka import TopicPartition
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata

        buf = self.buffers.pop(partition, None)
        if buf is None:
            return
        paths = self._write(partition, buf) if len(buf) else []
        self.stats.files += len(paths)
        self.stats.events += len(buf)
        if self.after_write is not None:
            self.after_write(paths)
        try:
            self.consumer.commit({TopicPartition(self.topic, partition): OffsetAndMetadata(buf.next_offset, "", -1)})
            self.stats.commits += 1
            log.info("committed partition %d at offset %d", partition, buf.next_offset)
        except KafkaError as exc:
            # Lost the partition in a rebalance: its new owner re-reads from the last commit and writes these
            # records again (under the same names where the boundaries agree; the reader counts each
            # (partition, offset) once).
            self.stats.commit_failures += 1
            log.warning("commit of partition %d at %d failed (%s): the records will be written again",
                        partition, buf.next_offset, exc)

    def flush_all(self) -> None:
        for p in sorted(self.buffers):
            self.flush(p)

    # -- consuming -----------------------------------------------------------------------------------------
    def _add(self, m) -> None:
        buf = self.buffers.get(m.partition)
        if buf is None:
            buf = self.buffers[m.partition] = _Buffer(m.offset)
        buf.next_offset = m.offset + 1
        self.stats.records += 1
        try:
            e = parse_event(m.value, m.key)
        except BadEvent:
            self.stats.bad += 1
            return
        c = buf.cols
        c["user_id"].append(e.user_id)
        c["item_id"].append(e.item_id)
        c["event_type"].append(e.event_type)
        c["ts"].append(float(e.ts))
        c["event_id"].append(e.event_id)
        c["partition"].append(m.partition)
        c["offset"].append(m.offset)
        buf.days.append(self._day(e.ts))

    def _listener(self):
        """Revoked partitions: their buffers are dropped (by the polling thread, after the poll), neither
        written nor committed; whoever owns them next reads them again from the last commit. (kafka-python
        runs this listener on its IO thread, where a commit cannot block.)"""
        from kafka import ConsumerRebalanceListener

        archiver = self

        class Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked):
                archiver._revoked.update(tp.partition for tp in revoked)

            def on_partitions_assigned(self, assigned):
                archiver.stats.partitions = sorted({*archiver.stats.partitions, *(tp.partition for tp in assigned)})
                log.info("archiving partitions %s of %s", sorted(tp.partition for tp in assigned), archiver.topic)

        return Listener()

    def run(self, until_idle: float | None = None, stop=None, max_records: int | None = None) -> ArchiveStats:
        """Consume and archive. Returns when `until_idle` seconds passed with partitions assigned and no new
        record, when `stop` (a threading.Event) is set, or after `max_records`; buffers are written first."""
        from kafka import KafkaConsumer

        self.out.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()
        t0 = time.monotonic()
        timeout_ms = int(self.session_timeout * 1000)
        self.consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=self.group, client_id=f"lsti-archive-{self._tag}",
            enable_auto_commit=False, auto_offset_reset="earliest", allow_auto_create_topics=False,
            session_timeout_ms=timeout_ms, heartbeat_interval_ms=max(100, timeout_ms // 3),
            max_poll_records=min(self.file_events, 10_000), fetch_max_wait_ms=200,
            # A topic created just before: the group's first assignment may be computed from metadata that
            # lacks it (an empty assignment, seen in a CI run), and kafka-python rejoins only when a metadata
            # refresh shows the topic, by default after 5 minutes.
            metadata_max_age_ms=5000,
            **kafka_python_security_from_env())
        deadline = time.monotonic() + 30.0
        while not self.consumer.partitions_for_topic(self.topic) and time.monotonic() < deadline:
            time.sleep(0.5)  # its metadata first, so the first assignment covers it
        self.consumer.subscribe([self.topic], listener=self._listener())
        log.info("archive of %s (group %s) into %s", self.topic, self.group, self.out)
        last_record = started = time.monotonic()
        ever_assigned = False
        try:
            while not (stop is not None and stop.is_set()):
                got = self.consumer.poll(timeout_ms=200)
                now = time.monotonic()
                while self._revoked:
                    p = self._revoked.pop()
                    dropped = self.buffers.pop(p, None)
                    if dropped is not None:
                        log.info("partition %d revoked: %d buffered records dropped (read again from the last "
                                 "commit)", p, dropped.next_offset - dropped.first_offset)
                for msgs in got.values():
                    for m in msgs:
                        self._add(m)
                assigned = bool(self.consumer.assignment())
                ever_assigned |= assigned
                if got or not assigned:
                    last_record = now
                if until_idle is not None and not ever_assigned and now - started > max(until_idle, 30.0):
                    log.warning("no partition of %s assigned after %.0fs (does the topic exist?): stopping",
                                self.topic, now - started)
                    break
                for p, buf in list(self.buffers.items()):
                    if len(buf) >= self.file_events or now - buf.started >= self.flush_seconds:
                        self.flush(p)
                if max_records is not None and self.stats.records >= max_records:
                    break
                if until_idle is not None and now - last_record >= until_idle:
                    log.info("no new record for %.1fs: stopping", until_idle)
                    break
            self.flush_all()
        finally:
            self.consumer.close(autocommit=False)
            self.stats.seconds = round(time.monotonic() - t0, 3)
        log.info("%s", self.stats.line())
        return self.stats


def run_archive(bootstrap: str, out: Path, topic_prefix: str = "", group: str = DEFAULT_GROUP,
                until_idle: float | None = None, file_events: int = FILE_EVENTS,
                flush_seconds: float = FLUSH_SECONDS, **kw) -> ArchiveStats:
    """Archive `{topic_prefix}events` into `out` (see the module doc)."""
    arch = Archiver(bootstrap, out, Topics.with_prefix(topic_prefix).events, group, file_events, flush_seconds, **kw)
    return arch.run(until_idle=until_idle)


def main_archive(args, bootstrap: str) -> int:
    """Entry point of `lsti archive` (options in streams/cli/main.py); one JSON summary line on stdout."""
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    arch = Archiver(bootstrap, args.out, Topics.with_prefix(args.topic_prefix).events, args.group,
                    args.file_events, args.flush_seconds)
    stats = arch.run(until_idle=args.until_idle, stop=stop)
    print(stats.line(), flush=True, file=sys.stderr)
    print(json.dumps({"out": str(args.out), **asdict(stats)}), flush=True)
    return 0
