"""Worker settings in one place: topic names, batching, Kafka and Faust knobs (env LSTI_* overrides)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def state_home() -> Path:
    """Where our own runtime data lives (broker data, worker RocksDB): LSTI_HOME or ./.lsti."""
    return Path(os.environ.get("LSTI_HOME", REPO / ".lsti"))


@dataclass
class Topics:
    events: str = "events"
    recommendations: str = "recommendations"
    dlq: str = "events-dlq"
    long_term: str = "long-term"
    model_versions: str = "model-versions"
    items: str = "items"
    forget: str = "forget"  # user ids whose states are to be deleted (privacy), keyed like events

    @classmethod
    def with_prefix(cls, prefix: str) -> Topics:
        """Namespaced topics, so a test or a demo run on a shared Kafka sees only its own records."""
        return cls(**{f.name: prefix + f.default for f in fields(cls)})


@dataclass
class WorkerSettings:
    bootstrap: str
    artifact: Path
    data_dir: Path
    app_id: str = "lsti"
    topics: Topics = field(default_factory=Topics)
    partitions: int = 4
    k: int = 10
    batch_max: int = 500
    batch_within: float = 0.01
    # Fetched batches queued ahead of the agent (Faust's stream buffer; a full one pauses fetching). 8 left the
    # agent waiting for records 15% of a drain, 32 2% (BENCHMARKS.md section 3); 32 x 500 records ~ 3 MB.
    stream_buffer: int = 32
    web_port: int = 0  # 0: pick a free port
    web_bind: str = "127.0.0.1"  # LSTI_WEB_BIND: 0.0.0.0 to serve other hosts
    web_advertise: str = ""  # LSTI_WEB_ADVERTISE: the host other workers reach this one at (default: see below)
    session_timeout: float = 10.0
    heartbeat: float = 1.0
    producer_linger_ms: int = 0  # answers and states go out as record batches already: waiting adds latency only
    # The GIL switch interval of the worker process (Python's default 5 ms). Faust's consumer thread needs the GIL
    # to read fetch answers and hand records over while the agent computes: p99 at 4,000 events/s was 310 and
    # 274 ms with 1 ms against 393-577 ms with 5 ms (runs alternated; BENCHMARKS.md section 3, session 9).
    switch_interval_s: float = 0.001
    loglevel: str = "info"
    processing_guarantee: str = "at_least_once"  # or "exactly_once" (Kafka transactions)
    max_lateness: float = 0.0  # seconds an event may be older than the user's last one before it is stale
    security: dict = field(default_factory=dict)  # SASL/TLS settings passed through to Faust
    explain: bool = False  # LSTI_EXPLAIN=1: each recommended item says which recent event it follows ("because")
    state_dtype: str = "float32"  # h, c precision in the table: float32 or float16 (408 vs 664 B/user at dim 64)
    stall_after: float = 20.0  # seconds with events waiting and none consumed before the stall watch acts (0: off)
    unstick_stalls: bool = True  # after logging a stall, put the stuck partitions back into the fetch set
    fault_stop_fetch_after: int = 0  # fault injection for tests: after this many events, stop fetching (0: off)
    fault_drop_fetched_after: int = 0  # tests: after this many events, the consumer drops one fetched run (0: off)
    fault_skip_batch_after: int = 0  # tests: after this many events, the agent skips one delivered batch (0: off)

    @property
    def canonical_url(self) -> str:
        """Where other workers send a request for a user this one owns (Faust's table routing)."""
        host = self.web_advertise
        if not host:
            host = self.web_bind if self.web_bind not in ("0.0.0.0", "::", "") else socket.getfqdn()
        return f"http://{host}:{self.web_port}"

    @classmethod
    def from_env(cls, **overrides) -> WorkerSettings:
        env = os.environ
        base = dict(
            bootstrap=env.get("LSTI_BOOTSTRAP", ""),
            artifact=Path(env.get("LSTI_ARTIFACT", "")),
            data_dir=Path(env.get("LSTI_WORKER_DIR", state_home() / "worker")),
            batch_max=int(env.get("LSTI_BATCH_MAX", 500)),
            web_bind=env.get("LSTI_WEB_BIND", "127.0.0.1"),
            web_advertise=env.get("LSTI_WEB_ADVERTISE", ""),
            batch_within=float(env.get("LSTI_BATCH_WITHIN", 0.01)),
            stream_buffer=int(env.get("LSTI_STREAM_BUFFER", 32)),
            session_timeout=float(env.get("LSTI_SESSION_TIMEOUT", 10.0)),
            max_lateness=float(env.get("LSTI_MAX_LATENESS", 0.0)),
            producer_linger_ms=int(env.get("LSTI_PRODUCER_LINGER_MS", 0)),
            switch_interval_s=float(env.get("LSTI_SWITCH_INTERVAL", 0.001)),
            processing_guarantee=env.get("LSTI_PROCESSING_GUARANTEE", "at_least_once"),
            security=faust_security_from_env(),
            state_dtype=env.get("LSTI_STATE_DTYPE", "float32"),
            explain=env.get("LSTI_EXPLAIN", "0") not in ("0", "false", "no", ""),
            stall_after=float(env.get("LSTI_STALL_AFTER", 20.0)),
            unstick_stalls=env.get("LSTI_UNSTICK_STALLS", "1") not in ("0", "false", "no"),
            fault_stop_fetch_after=int(env.get("LSTI_FAULT_STOP_FETCH_AFTER", 0)),
            fault_drop_fetched_after=int(env.get("LSTI_FAULT_DROP_FETCHED_AFTER", 0)),
            fault_skip_batch_after=int(env.get("LSTI_FAULT_SKIP_BATCH_AFTER", 0)),
        )
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


def _ssl_context(env) -> object | None:
    import ssl

    if not (env.get("LSTI_KAFKA_SSL_CAFILE") or env.get("LSTI_KAFKA_SECURITY_PROTOCOL", "").endswith("SSL")):
        return None
    ctx = ssl.create_default_context(cafile=env.get("LSTI_KAFKA_SSL_CAFILE") or None)
    if env.get("LSTI_KAFKA_SSL_CERTFILE"):
        ctx.load_cert_chain(env["LSTI_KAFKA_SSL_CERTFILE"], env.get("LSTI_KAFKA_SSL_KEYFILE") or None)
    return ctx


def faust_security_from_env() -> dict:
    """SASL/TLS for the workers from LSTI_KAFKA_* variables (none set: plaintext, as on loopback).

    LSTI_KAFKA_SECURITY_PROTOCOL (SASL_SSL, SASL_PLAINTEXT, SSL), LSTI_KAFKA_SASL_MECHANISM (PLAIN,
    SCRAM-SHA-256, SCRAM-SHA-512), LSTI_KAFKA_SASL_USERNAME / _PASSWORD, LSTI_KAFKA_SSL_CAFILE,
    LSTI_KAFKA_SSL_CERTFILE / _KEYFILE.
    """
    import faust

    env = os.environ
    protocol = env.get("LSTI_KAFKA_SECURITY_PROTOCOL", "")
    ctx = _ssl_context(env)
    if protocol.startswith("SASL"):
        return {"broker_credentials": faust.SASLCredentials(
            username=env.get("LSTI_KAFKA_SASL_USERNAME"), password=env.get("LSTI_KAFKA_SASL_PASSWORD"),
            mechanism=env.get("LSTI_KAFKA_SASL_MECHANISM", "PLAIN"), ssl_context=ctx)}
    if ctx is not None:
        return {"broker_credentials": faust.SSLCredentials(ctx)}
    return {}


def kafka_python_security_from_env() -> dict:
    """The same LSTI_KAFKA_* settings as keyword arguments of kafka-python clients."""
    env = os.environ
    out: dict = {}
    if env.get("LSTI_KAFKA_SECURITY_PROTOCOL"):
        out["security_protocol"] = env["LSTI_KAFKA_SECURITY_PROTOCOL"]
    if env.get("LSTI_KAFKA_SASL_MECHANISM"):
        out["sasl_mechanism"] = env["LSTI_KAFKA_SASL_MECHANISM"]
    if env.get("LSTI_KAFKA_SASL_USERNAME"):
        out["sasl_plain_username"] = env["LSTI_KAFKA_SASL_USERNAME"]
        out["sasl_plain_password"] = env.get("LSTI_KAFKA_SASL_PASSWORD", "")
    for key, name in (("ssl_cafile", "CAFILE"), ("ssl_certfile", "CERTFILE"), ("ssl_keyfile", "KEYFILE")):
        if env.get(f"LSTI_KAFKA_SSL_{name}"):
            out[key] = env[f"LSTI_KAFKA_SSL_{name}"]
    return out
