"""Command-line side of Kafka with kafka-python: create topics, publish, consume, replay logs.

Workers use Faust's aiokafka; these tools are plain synchronous clients a user can script.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from streams.config import Topics, kafka_python_security_from_env
from streams.contracts.events import event_json

log = logging.getLogger("lsti.kafka")


class KafkaAccessError(RuntimeError):
    """The broker cannot be used with these settings: refused authentication, TLS, unreachable (one line)."""


_SETTINGS_HINT = ("LSTI_KAFKA_SECURITY_PROTOCOL, LSTI_KAFKA_SASL_MECHANISM, LSTI_KAFKA_SASL_USERNAME/_PASSWORD, "
                  "LSTI_KAFKA_SSL_CAFILE")


def check_access(bootstrap: str, timeout_s: float = 30.0) -> None:
    """Connect once with the LSTI_KAFKA_* settings (TLS handshake, SASL authentication, one metadata request)
    and raise `KafkaAccessError` with a one-line reason when that fails.

    Why: kafka-python 3 logs a refused SASL authentication and retries the bootstrap until its timeout,
    then reports only "Unable to bootstrap"; one aiokafka connection raises the broker's answer at once,
    so `lsti publish` / `lsti consume` fail fast and say what is wrong. The reason never holds a password.
    """
    import asyncio
    import ssl

    from aiokafka.conn import create_conn
    from aiokafka.errors import (
        KafkaConnectionError,
        KafkaError,
        SaslAuthenticationFailed,
        UnsupportedSaslMechanismError,
    )
    from aiokafka.protocol.metadata import MetadataRequest

    env = os.environ
    protocol = env.get("LSTI_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT") or "PLAINTEXT"
    mechanism = env.get("LSTI_KAFKA_SASL_MECHANISM", "PLAIN") or "PLAIN"
    kwargs: dict = {"security_protocol": protocol}
    if protocol.startswith("SASL"):
        if not env.get("LSTI_KAFKA_SASL_USERNAME") or not env.get("LSTI_KAFKA_SASL_PASSWORD"):
            raise KafkaAccessError(f"authentication: LSTI_KAFKA_SECURITY_PROTOCOL={protocol} needs "
                                   "LSTI_KAFKA_SASL_USERNAME and LSTI_KAFKA_SASL_PASSWORD")
        kwargs.update(sasl_mechanism=mechanism, sasl_plain_username=env["LSTI_KAFKA_SASL_USERNAME"],
                      sasl_plain_password=env["LSTI_KAFKA_SASL_PASSWORD"])
    if protocol.endswith("SSL"):  # as the workers' context: the CA file, else the system's CAs
        try:
            ctx = ssl.create_default_context(cafile=env.get("LSTI_KAFKA_SSL_CAFILE") or None)
            if env.get("LSTI_KAFKA_SSL_CERTFILE"):
                ctx.load_cert_chain(env["LSTI_KAFKA_SSL_CERTFILE"], env.get("LSTI_KAFKA_SSL_KEYFILE") or None)
        except (OSError, ssl.SSLError) as exc:
            raise KafkaAccessError(f"TLS: cannot read LSTI_KAFKA_SSL_CAFILE/_CERTFILE/_KEYFILE: {exc}") from None
        kwargs["ssl_context"] = ctx

    async def probe(host: str, port: int) -> None:
        conn = await create_conn(host, port, client_id="lsti-access-check",
                                 request_timeout_ms=int(timeout_s * 1000), **kwargs)
        try:
            await conn.send(MetadataRequest([]))
        finally:
            conn.close()

    reason = "no bootstrap address"
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    for address in filter(None, (a.strip() for a in bootstrap.split(","))):
        host, _, port = address.rpartition(":")
        try:
            quiet.setLevel(logging.WARNING)  # its INFO lines ("Loading SSL CA ...") would precede our one line
            asyncio.run(asyncio.wait_for(probe(host, int(port)), timeout_s))
            return
        except SaslAuthenticationFailed as exc:
            raise KafkaAccessError(f"authentication failed at {address} (SASL {mechanism} as user "
                                   f"{kwargs['sasl_plain_username']!r}): {exc.args[0] if exc.args else exc}; "
                                   "check LSTI_KAFKA_SASL_USERNAME/_PASSWORD") from None
        except UnsupportedSaslMechanismError as exc:
            raise KafkaAccessError(f"authentication: {address} does not offer SASL mechanism {mechanism}: "
                                   f"{exc}; set LSTI_KAFKA_SASL_MECHANISM") from None
        except ssl.SSLCertVerificationError as exc:
            raise KafkaAccessError(f"TLS: the certificate of {address} is not trusted ({exc.verify_message}); "
                                   "set LSTI_KAFKA_SSL_CAFILE to its CA (authentication not attempted)") from None
        except KafkaConnectionError as exc:
            reason = (f"{address} closed the connection ({exc}) with security protocol {protocol}: it may "
                      f"require TLS and/or SASL authentication; set {_SETTINGS_HINT}")
        except (OSError, KafkaError) as exc:  # TimeoutError is an OSError
            reason = f"cannot use the Kafka at {address} ({type(exc).__name__}: {str(exc) or 'timed out'})"
        except ValueError as exc:  # a port that is not a number
            reason = f"bad bootstrap address {address!r}: {exc}"
        finally:
            quiet.setLevel(level)
    raise KafkaAccessError(reason)


def ensure_topics(bootstrap: str, partitions: int = 4, topics: Topics | None = None) -> None:
    """Create the contract topics if missing (events and its co-partitioned long-term topic alike)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    t = topics or Topics()
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="lsti-admin", **kafka_python_security_from_env())
    try:
        existing = set(admin.list_topics())
        wanted = [NewTopic(t.events, partitions, 1), NewTopic(t.recommendations, partitions, 1),
                  NewTopic(t.dlq, 1, 1), NewTopic(t.long_term, partitions, 1),
                  NewTopic(t.model_versions, 1, 1, topic_configs={"cleanup.policy": "compact"}),
                  NewTopic(t.items, partitions, 1), NewTopic(t.forget, partitions, 1)]
        new = [n for n in wanted if n.name not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
            log.info("created topics %s", ", ".join(n.name for n in new))
    finally:
        admin.close()


def request_forget(bootstrap: str, users: list[str], topic: str = "forget") -> int:
    """Ask the workers to delete these users' states: one record per user on `topic`, keyed by the user id
    (so it reaches the worker owning the user's partition)."""
    import json as _json
    import time as _time

    prod = producer(bootstrap)
    now = _time.time()
    for user in users:
        prod.send(topic, key=user.encode(), value=_json.dumps({"user_id": user, "requested_at": now}).encode())
    prod.flush()
    prod.close()
    return len(users)


def publish_item_changes(bootstrap: str, changes: list, topic: str = "items") -> int:
    """Catalogue changes (streams.contracts.items.ItemChange) on the `items` topic, keyed by item id."""
    from streams.contracts.items import item_change_json

    prod = producer(bootstrap)
    for change in changes:
        prod.send(topic, key=change.item_id.encode(), value=item_change_json(change))
    prod.flush()
    prod.close()
    return len(changes)


def producer(bootstrap: str, linger_ms: int = 5):
    from kafka import KafkaProducer

    return KafkaProducer(bootstrap_servers=bootstrap, linger_ms=linger_ms, batch_size=256 * 1024,
                         acks=1, max_in_flight_requests_per_connection=1, retries=5,
                         **kafka_python_security_from_env())


def _open(path: Path) -> io.TextIOBase:
    if str(path).endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def read_event_log(path: str | Path) -> Iterator[dict]:
    """Events from JSONL or CSV (header `user_id,item_id,event_type,ts[,event_id]`), plain or gzip;
    '-' reads JSONL from stdin."""
    import csv

    if str(path) == "-":
        for line in sys.stdin:
            if line.strip():
                yield json.loads(line)
        return
    name = str(path).removesuffix(".gz")
    with _open(Path(path)) as f:
        if name.endswith(".csv"):
            yield from csv.DictReader(f)
        else:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def normalise(rec: dict) -> bytes:
    """A log record as contract JSON; a missing event_id gets a stable one from its content."""
    ts = float(rec["ts"])
    ts = int(ts) if ts.is_integer() else ts
    eid = rec.get("event_id") or uuid.uuid5(
        uuid.NAMESPACE_OID, f"{rec['user_id']}|{rec['item_id']}|{rec['event_type']}|{rec['ts']}").hex
    return event_json(str(eid), str(rec["user_id"]), str(rec["item_id"]), str(rec["event_type"]), ts)


def publish(bootstrap: str, records: Iterable[dict], topic: str = "events", rate: float | None = None,
            progress: bool = True, total: int | None = None, desc: str = "publish") -> int:
    """Send records keyed by user_id; `rate` events/s (None = as fast as possible)."""
    from tqdm import tqdm

    prod = producer(bootstrap)
    sent = 0
    start = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="ev", disable=not progress, mininterval=0.5)
    try:
        for rec in records:
            prod.send(topic, key=str(rec["user_id"]).encode(), value=normalise(rec))
            sent += 1
            if rate:
                ahead = sent / rate - (time.perf_counter() - start)
                if ahead > 0:
                    time.sleep(ahead)
            if sent % 256 == 0:
                bar.update(256)
        bar.update(sent % 256)
        prod.flush()
    finally:
        bar.close()
        prod.close()
    return sent


def publish_long_term(prod, topic: str, vectors_of: dict, user_ids) -> int:
    """Send the long-term vectors of `user_ids` (those that have one) keyed by user; returns how many."""
    from streams.contracts.vectors import encode_vector

    n = 0
    for uid in user_ids:
        if uid in vectors_of:
            prod.send(topic, key=uid.encode(), value=encode_vector(vectors_of[uid]))
            n += 1
    prod.flush()
    return n


def publish_raw(bootstrap: str, messages: Iterable[tuple[bytes | None, bytes | None]], topic: str) -> int:
    """Send (key, value) byte pairs untouched: for tests and for loading long-term vectors."""
    prod = producer(bootstrap)
    n = 0
    for key, value in messages:
        prod.send(topic, key=key, value=value)
        n += 1
    prod.flush()
    prod.close()
    return n


def consume(bootstrap: str, topic: str = "recommendations", from_beginning: bool = False,
            max_messages: int | None = None, timeout_s: float | None = None,
            group: str | None = None) -> Iterator[tuple[bytes | None, bytes]]:
    """Yield (key, value) until `max_messages` or `timeout_s` of silence (None = forever)."""
    from kafka import KafkaConsumer

    cons = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group,
                         auto_offset_reset="earliest" if from_beginning else "latest",
                         enable_auto_commit=group is not None, consumer_timeout_ms=int((timeout_s or 0) * 1000) or
                         float("inf"), fetch_max_wait_ms=50, **kafka_python_security_from_env())
    n = 0
    try:
        for msg in cons:
            yield msg.key, msg.value
            n += 1
            if max_messages is not None and n >= max_messages:
                return
    finally:
        cons.close()


def sort_by_time(records: Iterable[dict]) -> list[dict]:
    """Event-time order (stable, so same-second events keep their log order)."""
    return sorted(records, key=lambda r: float(r["ts"]))


class TopicReader(threading.Thread):
    """Reads a topic from its current end (positions fixed before anything is published)."""

    def __init__(self, bootstrap: str, topic: str):
        super().__init__(daemon=True)
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20,
                                      **kafka_python_security_from_env())
        parts = self.consumer.partitions_for_topic(topic) or {0}
        tps = [TopicPartition(topic, p) for p in parts]
        self.consumer.assign(tps)
        self.consumer.seek_to_end(*tps)
        for tp in tps:
            self.consumer.position(tp)  # resolve now, not lazily after we publish
        self.records: list[tuple[int, bytes]] = []  # (broker timestamp ms, value)
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            for batch in self.consumer.poll(timeout_ms=100).values():
                self.records.extend((m.timestamp, m.value) for m in batch)
        self.consumer.close()


def read_compacted(bootstrap: str, topic: str, timeout_s: float = 30.0) -> dict[bytes, bytes]:
    """The latest value per key of a topic, read from the beginning to its current end (a table's
    changelog read this way is the table)."""
    from kafka import KafkaConsumer, TopicPartition

    cons = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, **kafka_python_security_from_env())
    try:
        tps = [TopicPartition(topic, p) for p in (cons.partitions_for_topic(topic) or [])]
        if not tps:
            return {}
        cons.assign(tps)
        cons.seek_to_beginning(*tps)
        end = cons.end_offsets(tps)
        out: dict[bytes, bytes] = {}
        deadline = time.time() + timeout_s
        while any(cons.position(tp) < end[tp] for tp in tps) and time.time() < deadline:
            for batch in cons.poll(timeout_ms=200).values():
                for m in batch:
                    if m.value is None:
                        out.pop(m.key, None)
                    else:
                        out[m.key] = m.value
        return out
    finally:
        cons.close()
