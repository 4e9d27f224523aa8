"""`lsti nightly`: refresh the live model for today's catalogue and histories without retraining.

Why no retraining: the LSTM, attention and gate weights stay as they are, so users' short-term
states in the workers stay valid across the swap (the manifest keeps the base's `weights_version`).
What changes each night:
- the catalogue: known items keep their codes; new items are appended with BERT text vectors and
  zero id embeddings (they rank by text alone until the next retrain); changed texts get new vectors;
- every active user's long-term vector, pooled over the history up to the cutoff;
- the item index.
Only new or changed texts go through BERT (TextEncoder caches by sha1(text)); long-term vectors are
saved in chunks under a work folder, so a run killed halfway resumes where it stopped. The artifact
is written atomically (streams.artifacts.write_artifact), published, and only then made CURRENT.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from encoders.data import Interactions, load_dataset
from encoders.model import LSTIConfig, LSTIModel
from encoders.split import Sequence
from streams.artifacts import (
    Artifact,
    BadArtifact,
    current_version,
    default_artifacts_dir,
    load_artifact,
    set_current,
    sha256,
    verify_artifact,
    write_artifact,
)
from streams.batch.build import item_index_for, long_term_vectors

log = logging.getLogger("lsti.nightly")

CONTROL_TOPIC = "model-versions"
CHANGED_ATOL = 1e-4  # a known item whose fresh BERT vector differs more than this had its text changed
TOKENS_PER_BATCH = 65_536  # padded events per forward pass of the long-term pooling (bounds memory)


@dataclass
class NightlyResult:
    """What a run produced: the artifact, its counts and the seconds spent per phase."""

    path: Path
    version: str
    parent: str
    weights_version: str
    counts: dict
    timings: dict = field(default_factory=dict)
    published: bool = False
    activated: bool = False
    control: dict | None = None

    def summary(self) -> str:
        c = self.counts
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items() if k != "total")
        return (f"nightly {self.version} (parent {self.parent}): {c['items']:,} items ({c['items_new']:,} new, "
                f"{c['items_changed']:,} changed), texts {c['texts_encoded']:,} encoded / {c['texts_cached']:,} "
                f"cached, {c['users']:,} users ({c['chunks_reused']}/{c['chunks']} chunks reused); {phases}; "
                f"total {self.timings.get('total', 0.0):.1f}s"
                + ("; published" if self.published else "") + ("; CURRENT" if self.activated else ""))


class _Phases:
    """Wall-clock seconds per named phase, in order."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.seconds: dict[str, float] = {}

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.last, 3)
        self.last = now

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": round(time.perf_counter() - self.t0, 3)}


def history_until(data: Interactions, cutoff: int | None) -> Interactions:
    """The same table with events after `cutoff` dropped (ids, codes and texts unchanged)."""
    if cutoff is None:
        return data
    keep = data.ts <= cutoff
    return Interactions(users=data.users[keep], items=data.items[keep], etypes=data.etypes[keep], ts=data.ts[keep],
                        user_ids=data.user_ids, item_ids=data.item_ids, item_texts=data.item_texts, name=data.name)


def data_fingerprint(data: Interactions) -> str:
    """sha1 over events, ids and texts: the work folder of one input never serves another."""
    h = hashlib.sha1()
    for arr in (data.users, data.items, data.etypes, data.ts):
        h.update(np.ascontiguousarray(arr, np.int64).tobytes())
    for strings in (data.user_ids, data.item_ids, data.item_texts):
        h.update("\x1f".join(strings).encode("utf-8"))
        h.update(b"\x1e")
    return h.hexdigest()


def resolve_base(base: str | Path | None, root: Path) -> Path:
    """--base: a folder, a version name under the artifacts root, or CURRENT (the default)."""
    if base is None or str(base) == "CURRENT":
        version = current_version(root) if root.exists() else None
        if not version:
            raise FileNotFoundError(f"no CURRENT artifact in {root}: train one with `lsti train` or pass --base")
        return root / version
    p = Path(base)
    if p.is_dir():
        return p
    if (root / str(base)).is_dir():
        return root / str(base)
    raise FileNotFoundError(f"base artifact {base} not found (neither a folder nor a version in {root})")


def extend_catalogue(base: Artifact, data: Interactions) -> tuple[list[str], np.ndarray]:
    """New item_ids list (base ids first, in base order, then new ones) and data code -> new code."""
    item_ids = list(base.item_ids)
    code = {iid: i for i, iid in enumerate(item_ids) if i}
    for iid in data.item_ids[1:]:
        if iid not in code:
            code[iid] = len(item_ids)
            item_ids.append(iid)
    remap = np.zeros(len(data.item_ids), np.int64)
    remap[1:] = [code[iid] for iid in data.item_ids[1:]]
    return item_ids, remap


def extend_model(base: LSTIModel, text: torch.Tensor) -> LSTIModel:
    """The base model over a larger catalogue: same weights, new `text` rows, zero id rows appended."""
    n_old = base.cfg.n_items + 1
    cfg = LSTIConfig(**{**base.cfg.to_dict(), "n_items": int(text.shape[0]) - 1})
    state = {k: v.clone() for k, v in base.state_dict().items()}
    state["text"] = text.float()
    id_w = torch.zeros(text.shape[0], base.cfg.dim, dtype=state["id_emb.weight"].dtype)
    id_w[:n_old] = state["id_emb.weight"]
    state["id_emb.weight"] = id_w
    model = LSTIModel(cfg, state["text"])
    model.load_state_dict(state)
    return model.eval()


def _encoder(cache_dir: Path | None):
    from encoders.text import TextEncoder

    return TextEncoder(cache_dir=cache_dir)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def _long_term_chunked(model: LSTIModel, seqs: list[Sequence], work: Path, chunk_users: int,
                       progress: bool) -> tuple[np.ndarray, int, int]:
    """Long-term vectors of `seqs` (in order), computed in chunks saved under `work`.

    Users are processed shortest history first so padding stays small; a chunk file that already
    exists (from a killed run with the same key) is loaded, not recomputed."""
    from tqdm import tqdm

    order = sorted(range(len(seqs)), key=lambda r: (len(seqs[r].items), r))
    out = np.zeros((len(seqs), model.cfg.dim), np.float32)
    n_chunks = (len(order) + chunk_users - 1) // chunk_users
    reused = 0
    bar = tqdm(total=len(order), desc="long-term", unit="user", disable=not progress)
    for c in range(n_chunks):
        rows = order[c * chunk_users : (c + 1) * chunk_users]
        f = work / f"long-{c:05d}.npy"
        vecs = None
        if f.exists():
            try:
                vecs = np.load(f)
            except (OSError, ValueError):
                vecs = None
            if vecs is not None and vecs.shape != (len(rows), model.cfg.dim):
                vecs = None
        if vecs is None:
            chunk = [seqs[r] for r in rows]
            longest = max(1, max(len(s.items) for s in chunk))
            vecs = long_term_vectors(model, chunk, batch=max(1, TOKENS_PER_BATCH // longest))
            _save_npy(f, vecs)
        else:
            reused += 1
        out[rows] = vecs
        bar.update(len(rows))
    bar.close()
    return out, n_chunks, reused


def _next_version(root: Path, stem: str) -> str:
    version = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 2
    while (root / version).exists():
        version = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
        n += 1
    return version


def ensure_nightly_topics(bootstrap: str, prefix: str = "", partitions: int = 4) -> None:
    """Create the long-term topic (co-partitioned with `events` when that exists) and the compacted
    `model-versions` control topic if missing."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    from streams.config import Topics, kafka_python_security_from_env

    topics = Topics.with_prefix(prefix)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="lsti-nightly", **kafka_python_security_from_env())
    try:
        existing = set(admin.list_topics())
        if topics.events in existing:
            desc = admin.describe_topics([topics.events])
            partitions = len(desc[0]["partitions"]) or partitions
        wanted = []
        if topics.long_term not in existing:
            wanted.append(NewTopic(topics.long_term, partitions, 1))
        if prefix + CONTROL_TOPIC not in existing:
            wanted.append(NewTopic(prefix + CONTROL_TOPIC, 1, 1, topic_configs={"cleanup.policy": "compact"}))
        if wanted:
            try:
                admin.create_topics(wanted)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


def publish_nightly(bootstrap: str, path: Path, users: list[str], vectors: np.ndarray, prefix: str = "",
                    progress: bool = True, partitions: int = 4) -> dict:
    """Long-term vectors to `{prefix}long-term`, then the control message to `{prefix}model-versions`.

    Every send is acknowledged before the control message goes out, so a worker that swaps on the
    control message already has the new vectors in its table's topic. Returns the control message."""
    from tqdm import tqdm

    from streams.config import Topics
    from streams.contracts.vectors import encode_vector
    from streams.kafka.tools import producer

    ensure_nightly_topics(bootstrap, prefix, partitions)
    topic = Topics.with_prefix(prefix).long_term
    prod = producer(bootstrap)
    errors: list[BaseException] = []
    try:
        bar = tqdm(total=len(users), desc="publish long-term", unit="user", disable=not progress, mininterval=0.5)
        for i, (uid, vec) in enumerate(zip(users, vectors, strict=True)):
            prod.send(topic, key=uid.encode("utf-8"), value=encode_vector(vec)).add_errback(errors.append)
            if i % 1024 == 1023:
                bar.update(1024)
        bar.update(len(users) % 1024)
        bar.close()
        prod.flush()
        if errors:
            raise RuntimeError(f"{len(errors)} long-term vectors were not acknowledged: {errors[0]!r}")
        manifest = json.loads((path / "manifest.json").read_text())
        control = {"version": manifest["version"], "path": str(path.resolve()),
                   "weights_version": manifest["weights_version"], "sha256_manifest": sha256(path / "manifest.json"),
                   "ts": time.time()}
        prod.send(prefix + CONTROL_TOPIC, key=b"model", value=json.dumps(control).encode()).get(timeout=60)
        return control
    finally:
        prod.close()


def run_nightly(
    dataset: str | None = "ml-1m",
    data_dir: Path | None = None,
    events: Path | None = None,
    items: Path | None = None,
    base: str | Path | None = None,
    cutoff: int | None = None,
    root: Path | None = None,
    bootstrap: str | None = None,
    topic_prefix: str = "",
    publish: bool = True,
    activate: bool | None = None,
    progress: bool = True,
    version: str | None = None,
    work_dir: Path | None = None,
    cache_dir: Path | None = None,
    chunk_users: int = 512,
    partitions: int = 4,
    data: Interactions | None = None,
) -> NightlyResult:
    """Build (and unless `publish` is False, publish) a new artifact from `base` for the history up to
    `cutoff`; `activate` (default: same as `publish`) makes it CURRENT once everything succeeded."""
    activate = publish if activate is None else activate
    if publish and not bootstrap:
        raise ValueError("publishing needs a Kafka bootstrap (or pass publish=False)")
    root = Path(root) if root else default_artifacts_dir()
    root.mkdir(parents=True, exist_ok=True)
    ph = _Phases()

    data = history_until(data or load_dataset(dataset, data_dir, events, items), cutoff)
    cutoff_ts = int(cutoff) if cutoff is not None else (int(data.ts.max()) if len(data.ts) else 0)
    ph.done("load_data")

    base_art = load_artifact(resolve_base(base, Path(root)), index_backend="faiss-cpu")
    base_model = base_art.model
    item_ids, remap = extend_catalogue(base_art, data)
    n_old = len(base_art.item_ids)
    ph.done("load_base")

    # Every text of the data's catalogue goes through the cache; only unseen texts reach BERT.
    encoder = _encoder(cache_dir)
    if encoder.dim != base_model.cfg.text_dim:
        raise BadArtifact(f"text encoder dimension {encoder.dim} != base model text_dim {base_model.cfg.text_dim}")
    fresh = encoder.encode(data.item_texts[1:], progress=progress)
    stats = dict(encoder.stats)
    text = torch.zeros(len(item_ids), base_model.cfg.text_dim)
    text[:n_old] = base_model.text
    new_codes = torch.from_numpy(remap[1:])
    fresh_t = torch.from_numpy(fresh)
    known = new_codes < n_old
    diff = (fresh_t[known] - text[new_codes[known]]).abs().amax(dim=1) if known.any() else torch.zeros(0)
    changed = int((diff > CHANGED_ATOL).sum())
    take = ~known
    take[known] = diff > CHANGED_ATOL
    text[new_codes[take]] = fresh_t[take]
    ph.done("encode_texts")

    model = extend_model(base_model, text)
    ph.done("build_model")

    active = [u for u in range(data.n_users) if data.user_offsets[u + 1] > data.user_offsets[u]]
    seqs = []
    for u in active:
        sl = data.user_slice(u)
        seqs.append(Sequence(u, remap[data.items[sl]], data.etypes[sl], data.ts[sl]))
    key = hashlib.sha1("|".join([base_art.version, str(cutoff_ts), data_fingerprint(data),
                                 hashlib.sha1(text.numpy().tobytes()).hexdigest(), str(chunk_users)]).encode())
    work_root = Path(work_dir) if work_dir else root / ".nightly-work"
    work = work_root / key.hexdigest()[:16]
    work.mkdir(parents=True, exist_ok=True)
    (work / "key.json").write_text(json.dumps({"base": base_art.version, "cutoff_ts": cutoff_ts,
                                               "users": len(seqs), "chunk_users": chunk_users}))
    longs, n_chunks, reused = _long_term_chunked(model, seqs, work, chunk_users, progress)
    users = [data.user_ids[u] for u in active]
    ph.done("long_term")

    index = item_index_for(model)
    ph.done("index")

    counts = {"items": len(item_ids) - 1, "items_new": len(item_ids) - n_old, "items_changed": changed,
              "texts_encoded": int(stats["encoded"]), "texts_cached": int(stats["cached"]),
              "users": len(users), "events": int(len(data.items)), "chunks": n_chunks, "chunks_reused": reused}
    stem = f"{data.name}-{base_model.cfg.mode}-nightly"
    version = version or _next_version(root, stem)
    meta = {"weights_version": base_art.weights_version, "parent": base_art.version, "cutoff_ts": cutoff_ts,
            "nightly": True, "dataset": data.name, "mode": base_model.cfg.mode, "counts": counts,
            "texts_per_second": round(stats["encoded"] / stats["seconds"], 1) if stats["encoded"] else None,
            "timings": ph.total()}
    for k in ("train", "train_info", "test_metrics"):  # what the weights were fitted and scored on
        if k in base_art.manifest:
            meta[f"base_{k}"] = base_art.manifest[k]
    path = write_artifact(root, version, model, item_ids, index, users, longs, meta)
    verify_artifact(path)
    ph.done("write")

    result = NightlyResult(path, version, base_art.version, base_art.weights_version, counts)
    if publish:
        result.control = publish_nightly(bootstrap, path, users, longs, topic_prefix, progress, partitions)
        result.published = True
        ph.done("publish")
    if activate:
        set_current(root, version)
        result.activated = True
    shutil.rmtree(work, ignore_errors=True)
    result.timings = ph.total()
    log.debug("%s", result.summary())
    return result


def main_nightly(args: argparse.Namespace) -> int:
    """Entry point of `lsti nightly` (argparse options as documented in the CLI)."""
    bootstrap = None
    if not args.no_publish:
        from streams.kafka.bootstrap import resolve_bootstrap

        bootstrap = resolve_bootstrap(args)
    try:
        result = run_nightly(args.dataset, args.data_dir, args.events, args.items, base=args.base,
                             cutoff=args.cutoff, root=args.out, bootstrap=bootstrap,
                             topic_prefix=args.topic_prefix, publish=not args.no_publish,
                             activate=True if getattr(args, "activate", False) else None, progress=not args.quiet)
    except (FileNotFoundError, BadArtifact) as e:
        sys.exit(f"error: {e}")
    print(result.summary(), file=sys.stderr)
    print(json.dumps({"version": result.version, "path": str(result.path), "counts": result.counts,
                      "timings": result.timings, "published": result.published, "current": result.activated}))
    return 0
