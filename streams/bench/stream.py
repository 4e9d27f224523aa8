"""`lsti bench stream`: sustained events/s and event-to-recommendation latency of the full pipeline,
measured beside the references of the same stack, on the same broker and the same pre-published input
topic, in one run (`SYSTEMS`; `streams/bench/refs.py` runs the references):

- `model`: `Recommender.process` alone over pre-parsed batches, in this process (no Kafka, no Faust);
- `aiokafka`: plain aiokafka consume-decode-produce loop, the ceiling and every ratio's denominator;
- `aiokafka-batched`: the same loop producing record batches per partition (`send_batch`), a harder ceiling;
- `faust`: trivial Faust agent, one awaited send per event (Faust's per-record floor);
- `faust-batch-table`: Faust on the worker's batch path with its fenced RocksDB table, no model;
- `lsti`: the full worker.

Each system's entry carries `vs_aiokafka` (its events/s over the aiokafka loop's); `machine` holds the
CPU count and the load average at the start and the end of the run (each system's in `load_avg_1m`).

Throughput: N events are published first; each system then drains them; its rate is N divided by the
span between its first and last output record (broker timestamps). Latency: with the LSTI worker
caught up, events are published at a fixed rate (default half the measured sustained rate), each
carrying its send time; latency = output record timestamp - send time.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from streams.config import REPO, Topics, state_home

SYSTEMS = ("model", "aiokafka", "aiokafka-batched", "faust", "faust-batch-table", "lsti")
PROFILABLE = tuple(x for x in SYSTEMS if x != "model")  # each runs as a process of its own, which py-spy records
TAOBAO_MIX = {"view": 0.898, "cart": 0.053, "fav": 0.028, "buy": 0.021}  # event shares in the Taobao log


def synthetic_artifact(root: Path, n_items: int, dim: int, seed: int = 0) -> Path:
    """Random (untrained) model weights over a synthetic catalogue: the cost of serving does not depend
    on how well the weights were trained, and this needs no data and no BERT."""
    import torch

    from encoders.model import LSTIConfig, LSTIModel
    from streams.artifacts import write_artifact
    from streams.batch.build import item_index_for

    version = f"bench-{n_items}-{dim}"
    if (root / version / "manifest.json").exists():
        return root / version
    torch.manual_seed(seed)
    text = torch.nn.functional.normalize(torch.randn(n_items + 1, 384), dim=-1)
    text[0] = 0
    model = LSTIModel(LSTIConfig(n_items=n_items, dim=dim), text).eval()
    with torch.no_grad():
        model.id_emb.weight.normal_(0, 0.1)
    item_ids = [""] + [f"item{i}" for i in range(1, n_items + 1)]
    return write_artifact(root, version, model, item_ids, item_index_for(model), [], np.zeros((0, dim)), {})


def zipf_stream(n: int, n_users: int, n_items: int, seed: int = 0, a: float = 1.1):
    """Users and items drawn from Zipf laws (a few heavy users and hit items, a long tail)."""
    rng = np.random.default_rng(seed)

    def zipf(size: int, k: int) -> np.ndarray:
        p = 1.0 / np.arange(1, k + 1) ** a
        return rng.choice(k, size=size, p=p / p.sum())

    users = rng.permutation(n_users)[zipf(n, n_users)]
    items = rng.permutation(n_items)[zipf(n, n_items)] + 1
    types = rng.choice(list(TAOBAO_MIX), size=n, p=list(TAOBAO_MIX.values()))
    return users, items, types


def _messages(users, items, types, start: int, ts: float | None = None):
    from streams.contracts.events import event_json

    for j, (u, i, t) in enumerate(zip(users, items, types, strict=True)):
        uid = f"u{u}"
        yield uid.encode(), event_json(f"b{start + j}", uid, f"item{i}", str(t), ts or time.time())


def _drain_rate(reader, n: int, timeout: float) -> dict:
    deadline = time.time() + timeout
    while len(reader.records) < n and time.time() < deadline:
        time.sleep(0.2)
    stamps = np.array([ts for ts, _ in list(reader.records)], dtype=np.float64)
    if len(stamps) < 2:
        return {"events": int(len(stamps)), "events_per_s": 0.0, "complete": False}
    span = (stamps.max() - stamps.min()) / 1000.0
    return {"events": int(len(stamps)), "seconds": round(span, 3),
            "events_per_s": round(len(stamps) / span, 1) if span > 0 else 0.0, "complete": len(stamps) >= n}


def _proc(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
                            start_new_session=True)


def _stop(p: subprocess.Popen) -> None:
    import signal

    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def parsed_batches(msgs: list, size: int, partitions: int = 0) -> list:
    """Micro-batches of `Incoming` as the worker gets them: the events split over `partitions` partitions by
    a hash of the key (0: one stream, partition 0), each partition's events cut into batches of `size`."""
    import zlib

    from streams.contracts.events import parse_event
    from streams.worker.recommender import Incoming

    streams: list[list] = [[] for _ in range(max(1, partitions))]
    for k, v in msgs:
        streams[zlib.crc32(k) % len(streams) if partitions else 0].append((k, v))
    return [[Incoming(parse_event(v, k), p, b + j, v, k) for j, (k, v) in enumerate(recs[b : b + size])]
            for p, recs in enumerate(streams) for b in range(0, len(recs), size)]


def replay(rec, batches: list) -> float:
    """Seconds `rec.process` takes over `batches` in order, each user's state carried from batch to batch."""
    states: dict = {}
    t0 = time.perf_counter()
    for incs in batches:
        res = rec.process(incs, {i.event.user_id: states.get(i.event.user_id) for i in incs}, {})
        states.update(res.states)
    return time.perf_counter() - t0


def model_only(art_path: Path, users, items, types, batch: int = 500, explain: bool = False) -> dict:
    """The model object alone: `Recommender.process` per micro-batch over batches parsed beforehand (the
    parse is timed apart), no Kafka, no Faust, in this process: the cost of our own per-event work, with
    one BLAS/FAISS thread as in the worker."""
    from streams.artifacts import load_artifact
    from streams.worker.recommender import Recommender

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        threadpool_limits = None
    limiter = threadpool_limits(1) if threadpool_limits else None
    rec = Recommender(load_artifact(art_path, index_threads=1), explain=explain)
    msgs = list(_messages(users, items, types, 0, ts=1_700_000_000.0))
    t0 = time.perf_counter()
    batches = parsed_batches(msgs, batch)
    parse_secs = time.perf_counter() - t0
    secs = replay(rec, batches)
    if limiter is not None:
        limiter.unregister()
    return {"events": len(msgs), "seconds": round(secs, 3), "events_per_s": round(len(msgs) / secs, 1),
            "us_per_event": round(secs / len(msgs) * 1e6, 1), "batch": batch, "explain": explain,
            "measures": "Recommender.process over pre-parsed batches (parse timed apart)",
            "parse_us_per_event": round(parse_secs / len(msgs) * 1e6, 1),
            "with_parse_events_per_s": round(len(msgs) / (secs + parse_secs), 1)}


def resolve_systems(systems: tuple[str, ...] | list[str] | str) -> tuple[str, ...]:
    """Names as given (`all` = every one, in `SYSTEMS` order), duplicates dropped; an unknown one refused."""
    names = [x.strip() for x in (systems.split(",") if isinstance(systems, str) else systems) if x.strip()]
    if not names or "all" in names:
        return SYSTEMS
    unknown = [x for x in names if x not in SYSTEMS]
    if unknown:
        raise SystemExit(f"error: unknown system(s) {', '.join(unknown)}; choose from all, {', '.join(SYSTEMS)}")
    return tuple(dict.fromkeys(names))


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return []


def add_ratios(result: dict) -> None:
    """Each system's events/s over the aiokafka loop's, in its entry and in `vs_aiokafka`; the old keys too."""
    s = result["systems"]
    base = s.get("aiokafka", {}).get("events_per_s")
    if base:
        result["vs_aiokafka"] = {}
        for name, stats in s.items():
            if stats.get("events_per_s") is not None:
                stats["vs_aiokafka"] = result["vs_aiokafka"][name] = round(stats["events_per_s"] / base, 3)
    if "lsti" in s and "aiokafka" in s and s["aiokafka"]["events_per_s"]:
        result["lsti_vs_aiokafka"] = round(s["lsti"]["events_per_s"] / s["aiokafka"]["events_per_s"], 3)
    if "lsti" in s and "faust" in s and s["faust"]["events_per_s"]:
        result["lsti_vs_faust_trivial"] = round(s["lsti"]["events_per_s"] / s["faust"]["events_per_s"], 3)


def run_bench(n: int = 50_000, n_users: int = 100_000, n_items: int = 10_000, dim: int = 64,
              bootstrap: str | None = None, latency_seconds: float = 10.0, latency_rate: float | None = None,
              systems: tuple[str, ...] = SYSTEMS, batch_max: int | None = None,
              batch_within: float | None = None, progress: bool = True, profile: Path | None = None,
              workers: int = 1, explain: bool = False, profile_system: str = "lsti") -> dict:
    from streams.kafka.broker import scratch_broker
    from streams.kafka.tools import TopicReader, ensure_topics, publish_raw
    from streams.worker.process import WorkerProcess, free_port
    from streams.worker.state import StateCodec

    systems = resolve_systems(systems)
    if profile and profile_system not in systems:
        raise SystemExit(f"error: --profile-system {profile_system} is not among the systems run "
                         f"({', '.join(systems)}); add it to --systems")
    home = state_home() / "bench"
    home.mkdir(parents=True, exist_ok=True)
    bootstrap, broker = scratch_broker(bootstrap, home / "kafka")
    run = uuid.uuid4().hex[:6]
    result: dict = {"events": n, "users": n_users, "workers": workers, "items": n_items, "dim": dim,
                    "explain": explain,
                    "event_mix": TAOBAO_MIX,
                    "systems_run": list(systems),
                    "machine": {"cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0))
                                if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                                "platform": platform.platform(), "python": platform.python_version(),
                                "load_avg_start": _load()}, "systems": {}}
    try:
        art = synthetic_artifact(home / "artifacts", n_items, dim)
        topics = Topics.with_prefix(f"bench-{run}.")
        ensure_topics(bootstrap, 4, topics)
        users, items, types = zipf_stream(n, n_users, n_items)
        t0 = time.perf_counter()
        publish_raw(bootstrap, _messages(users, items, types, 0, ts=1_700_000_000.0), topics.events)
        result["publish_seconds"] = round(time.perf_counter() - t0, 2)
        if "model" in systems:
            load0 = _load()[:1]
            result["systems"]["model"] = model_only(art, users, items, types, batch_max or 500, explain)
            result["systems"]["model"]["load_avg_1m"] = load0 + _load()[:1]
            if progress:
                print(f"model: {json.dumps(result['systems']['model'])}", file=sys.stderr, flush=True)
        for name in (x for x in systems if x != "model"):
            out_topic = f"bench-{run}.out-{name}" if name != "lsti" else topics.recommendations
            ensure_topics(bootstrap, 4, Topics(topics.events, out_topic, topics.dlq, topics.long_term))
            reader = TopicReader(bootstrap, out_topic)
            reader.start()
            log = home / f"{run}-{name}.log"
            worker = None
            load0 = _load()[:1]
            if name == "lsti":
                extra = ["--app-id", f"bench-{run}-lsti", "--topic-prefix", f"bench-{run}."]
                if batch_max:
                    extra += ["--batch-max", str(batch_max)]
                if batch_within is not None:
                    extra += ["--batch-within", str(batch_within)]
                env = {"LSTI_EXPLAIN": "1"} if explain else None
                fleet = [WorkerProcess(bootstrap, art, home / f"{run}-worker{w}", log_path=log, extra=extra,
                                       env=env).start() for w in range(workers)]
                for w in fleet:
                    w.wait_ready()
                worker, proc = fleet[0], fleet[0].proc
            else:
                cmd = [sys.executable, "-m", "streams.bench.refs", name, "--bootstrap", bootstrap, "--src",
                       topics.events, "--dst", out_topic, "--group", f"bench-{run}-{name}", "-n", str(n),
                       "--datadir", str(home / f"{run}-{name}-data"), "--web-port", str(free_port())]
                if name == "faust-batch-table":
                    cmd += ["--batch-max", str(batch_max or 500), "--state-bytes", str(StateCodec(dim, "bench").size)]
                proc = _proc(cmd, log)
            spy = None
            if profile and name == profile_system:
                spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-o",
                                        str(profile), "-f", "speedscope", "-p", str(proc.pid), "-d", "60"],
                                       stdout=subprocess.DEVNULL, stderr=open(home / "py-spy.log", "ab"))
            stats = _drain_rate(reader, n, timeout=600)
            stats["load_avg_1m"] = load0 + _load()[:1]
            if name == "lsti":
                rate = latency_rate or max(100.0, stats["events_per_s"] / 2)
                stats["latency"] = _latency(bootstrap, topics.events, reader, rate, latency_seconds, n,
                                            n_users, n_items)
            if spy is not None:
                import signal

                spy.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
                spy.wait(60)
            reader.stop_flag.set()
            if worker is not None:
                for w in fleet:
                    w.stop()
            else:
                _stop(proc)
            result["systems"][name] = stats
            if progress:
                print(f"{name}: {json.dumps(stats)}", file=sys.stderr, flush=True)
        add_ratios(result)
    finally:
        result["machine"]["load_avg_end"] = _load()
        if broker is not None:
            broker.stop()
    return result


def _latency(bootstrap: str, topic: str, reader, rate: float, seconds: float, start: int, n_users: int,
             n_items: int) -> dict:
    """Publish at `rate` events/s for `seconds`, each event stamped with its send time."""

    m = int(rate * seconds)
    before = len(reader.records)
    # The publisher runs in its own process (aiokafka): in this one it would share the GIL with the reader
    # thread, and its client-side queue would count as the worker's latency.
    out = subprocess.run([sys.executable, "-m", "streams.bench.refs", "publish", "--bootstrap", bootstrap, "--dst",
                          topic, "--rate", str(rate), "--seconds", str(seconds), "--start", str(start),
                          "--users", str(n_users), "--items", str(n_items)], capture_output=True, text=True,
                         check=True, cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})
    achieved = m / json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
    deadline = time.time() + 60
    while len(reader.records) < before + m and time.time() < deadline:
        time.sleep(0.2)
    lat = np.array([ts - json.loads(v)["event_ts"] * 1000.0 for ts, v in list(reader.records)[before:]])
    if not len(lat):
        return {"rate": rate, "events": 0}
    # The publisher is paced to `rate` and never sends ahead of it; on a small machine it can fall behind
    # (it shares the cores with the broker and the worker): then the figures are not at `rate`.
    return {"rate": round(rate, 1), "events": int(len(lat)), "achieved_rate": round(achieved, 1),
            "publisher_kept_up": bool(achieved >= 0.9 * rate),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p95_ms": round(float(np.percentile(lat, 95)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1), "max_ms": round(float(lat.max()), 1)}
