"""Session fixtures: one real Apache Kafka per test session, one tiny model artifact built with the
real BERT weights on generated data, and real worker processes on namespaced topics."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def kafka(tmp_path_factory):
    """Bootstrap of a real broker: LSTI_TEST_BOOTSTRAP if set, else an embedded one for the session."""
    if os.environ.get("LSTI_TEST_BOOTSTRAP"):
        yield os.environ["LSTI_TEST_BOOTSTRAP"]
        return
    from streams.kafka.broker import EmbeddedKafka

    broker = EmbeddedKafka(tmp_path_factory.mktemp("kafka"), heap_mb=256)
    yield broker.start()
    broker.stop()


@pytest.fixture(scope="session")
def fixture_files(tmp_path_factory):
    from fixtures import write_fixture

    return write_fixture(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, fixture_files):
    """A real trained artifact (BERT text vectors, LSTM, gate, FAISS index) on the generated data."""
    from encoders.train import TrainConfig
    from streams.batch.build import build

    events, items = fixture_files
    root = tmp_path_factory.mktemp("artifacts")
    return build(None, events=events, items=items, train_cfg=TrainConfig(epochs=3, batch_size=32, lr=5e-3),
                 model_cfg={"dim": 16}, root=root, version="tiny-v1", progress=False)


@pytest.fixture
def namespace():
    """A fresh topic prefix and app id, so tests sharing the session broker never see each other."""
    run = uuid.uuid4().hex[:8]
    return {"prefix": f"t{run}.", "app_id": f"lsti-test-{run}"}


@pytest.fixture
def start_worker(kafka, tiny_artifact, tmp_path, namespace):
    """Start real `lsti run` worker processes; all are stopped at the end of the test."""
    from streams.worker.process import WorkerProcess

    workers = []

    def _start(name: str = "w1", extra: list[str] | None = None, extra_env: dict | None = None) -> WorkerProcess:
        extra_env = extra_env or {}
        w = WorkerProcess(kafka, tiny_artifact, tmp_path / name, log_path=tmp_path / f"{name}.log",
                          extra=["--app-id", namespace["app_id"], "--topic-prefix", namespace["prefix"],
                                 *(extra or [])],
                          env={"LSTI_SESSION_TIMEOUT": "3", **extra_env})
        workers.append(w.start())
        w.wait_ready()
        return w

    yield _start
    for w in workers:
        w.stop()
