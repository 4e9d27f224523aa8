"""Worker settings in one place: topic names, batching, Kafka and Faust knobs (env LSTI_* overrides)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
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

    @classmethod
    def with_prefix(cls, prefix: str) -> Topics:
        """Namespaced topics, so a test or a demo run on a shared Kafka sees only its own records."""
        return cls(*(prefix + name for name in (cls.events, cls.recommendations, cls.dlq, cls.long_term)))


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
    web_port: int = 0  # 0: pick a free port
    web_bind: str = "127.0.0.1"
    session_timeout: float = 10.0
    heartbeat: float = 1.0
    producer_linger_ms: int = 5
    loglevel: str = "info"
    security: dict = field(default_factory=dict)  # SASL/TLS settings passed through to Faust

    @classmethod
    def from_env(cls, **overrides) -> WorkerSettings:
        env = os.environ
        base = dict(
            bootstrap=env.get("LSTI_BOOTSTRAP", ""),
            artifact=Path(env.get("LSTI_ARTIFACT", "")),
            data_dir=Path(env.get("LSTI_WORKER_DIR", state_home() / "worker")),
            batch_max=int(env.get("LSTI_BATCH_MAX", 500)),
            batch_within=float(env.get("LSTI_BATCH_WITHIN", 0.01)),
            session_timeout=float(env.get("LSTI_SESSION_TIMEOUT", 10.0)),
        )
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)
