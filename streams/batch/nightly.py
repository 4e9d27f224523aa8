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

Inputs: a shared dataset, your own files, or the archive of the `events` topic (`--archive DIR`, written
by `lsti archive`, streams/jobs/archive.py). When a Kafka bootstrap is given, the `items` topic is read
whole (streams/contracts/items.py): added items get their text (and a code, even with no event yet),
deleted and unavailable items are recorded in the manifest (`item_status`; deleted items keep their codes,
histories name them). An item with no text known (the archive has ids only) keeps the base's text vector.

Sharding (`--shard i/n`, `--merge-shards`): the long-term vectors are the bulk of the work and are
independent per user, so n processes each compute the users with stable_hash(user) % n == i and write
them to a shard folder; a last step computes everything else, takes the vectors from the shards and
writes and publishes the artifact as an unsharded run does. `LongTermPooling` computes each user's vector
from that user's history alone, bit for bit (not from the other users in a batch, the padding, the
order or the thread count), so the merged artifact equals the unsharded one bit for bit. A shard whose
inputs differ from the merge's (other data, catalogue or base) is not used: the merge computes its users
itself and says so.
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

from encoders.data import Interactions, ItemUpdates, apply_item_updates, load_dataset, read_archive
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
SHARD_FILE = "shard.json"
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
        if "shard" in c:
            return (f"nightly shard {c['shard']} (base {self.parent}): {c['users']:,} of {c['users_all']:,} users "
                    f"({c['chunks_reused']}/{c['chunks']} chunks reused) -> {self.path}; {phases}; "
                    f"total {self.timings.get('total', 0.0):.1f}s")
        extra = ""
        if c.get("items_deleted") or c.get("items_unavailable"):
            extra += f", {c['items_deleted']:,} deleted, {c['items_unavailable']:,} unavailable"
        if "shards" in c:
            extra += (f"; long-term vectors from {c['shards_used']}/{c['shards']} shards"
                      + (f", {c['users_recomputed']:,} users computed here" if c["users_recomputed"] else ""))
        return (f"nightly {self.version} (parent {self.parent}): {c['items']:,} items ({c['items_new']:,} new, "
                f"{c['items_changed']:,} changed), texts {c['texts_encoded']:,} encoded / {c['texts_cached']:,} "
                f"cached{extra}, {c['users']:,} users ({c['chunks_reused']}/{c['chunks']} chunks reused); {phases}; "
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


def without_forgotten(data: Interactions, forgotten: dict[str, float]) -> Interactions:
    """The table without the events of forgotten users up to the time they asked (`lsti forget`): the
    nightly step must not publish a long-term vector built from a history the user had deleted."""
    if not forgotten:
        return data
    until = np.full(len(data.user_ids), -np.inf)
    index = {uid: u for u, uid in enumerate(data.user_ids)}
    for uid, at in forgotten.items():
        if uid in index:
            until[index[uid]] = at
    keep = data.ts > until[data.users]
    return Interactions(users=data.users[keep], items=data.items[keep], etypes=data.etypes[keep], ts=data.ts[keep],
                        user_ids=data.user_ids, item_ids=data.item_ids, item_texts=data.item_texts, name=data.name,
                        source=dict(data.source))


def read_forgotten(bootstrap: str, topic: str) -> dict[str, float]:
    """Users asked to be forgotten on the `forget` topic: user id -> the time of the last request (seconds,
    the record's timestamp). A missing topic reads as nobody."""
    from kafka import KafkaConsumer, TopicPartition

    from streams.config import kafka_python_security_from_env

    cons = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, allow_auto_create_topics=False,
                         client_id="lsti-nightly-forget", **kafka_python_security_from_env())
    out: dict[str, float] = {}
    try:
        if topic not in cons.topics():
            return out
        tps = [TopicPartition(topic, p) for p in sorted(cons.partitions_for_topic(topic) or [])]
        cons.assign(tps)
        cons.seek_to_beginning(*tps)
        end = cons.end_offsets(tps)
        while any(cons.position(tp) < end[tp] for tp in tps):
            for batch in cons.poll(timeout_ms=500).values():
                for m in batch:
                    if m.key:
                        uid = m.key.decode("utf-8", "replace")
                        out[uid] = max(out.get(uid, -np.inf), m.timestamp / 1000.0)
    finally:
        cons.close()
    log.info("forget topic %s: %d users to leave out up to their requests", topic, len(out))
    return out


def history_until(data: Interactions, cutoff: int | None) -> Interactions:
    """The same table with events after `cutoff` dropped (ids, codes and texts unchanged)."""
    if cutoff is None:
        return data
    keep = data.ts <= cutoff
    return Interactions(users=data.users[keep], items=data.items[keep], etypes=data.etypes[keep], ts=data.ts[keep],
                        user_ids=data.user_ids, item_ids=data.item_ids, item_texts=data.item_texts, name=data.name,
                        source=dict(data.source))


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
    """The base model over a larger catalogue: same weights, new `text` rows, zero id rows appended (both id
    tables with `long_ids`)."""
    n_old = base.cfg.n_items + 1
    cfg = LSTIConfig(**{**base.cfg.to_dict(), "n_items": int(text.shape[0]) - 1})
    state = {k: v.clone() for k, v in base.state_dict().items()}
    state["text"] = text.float()
    for name in ("id_emb.weight", "long_id.weight"):  # long_id: with `long_ids` only
        if name in state:
            id_w = torch.zeros(text.shape[0], base.cfg.dim, dtype=state[name].dtype)
            id_w[:n_old] = state[name]
            state[name] = id_w
    model = LSTIModel(cfg, state["text"])
    model.load_state_dict(state)
    return model.eval()


_ENCODERS: dict = {}


def _encoder(cache_dir: Path | None):
    """One BERT per cache folder and process (runs in one process, such as the shards of a test, load it once;
    the text cache is read from disk on every encode)."""
    from encoders.text import TextEncoder

    key = str(cache_dir or os.environ.get("LSTI_CACHE", ""))
    if key not in _ENCODERS:
        _ENCODERS[key] = TextEncoder(cache_dir=cache_dir)
    return _ENCODERS[key]


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def stable_hash(user_id: str) -> int:
    """A user's shard hash: the same in every process, machine and Python run (Python's hash() of a str is
    salted per process)."""
    return int.from_bytes(hashlib.blake2b(user_id.encode("utf-8"), digest_size=8).digest(), "big")


def parse_shard(text: str) -> tuple[int, int]:
    """`i/n` (0 <= i < n) -> (i, n); ValueError with the reason otherwise."""
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ValueError(f"shard {text!r} is not I/N (e.g. 0/4)") from None
    if not 0 <= i < n:
        raise ValueError(f"shard {text!r}: I must be in 0..N-1")
    return i, n


class LongTermPooling(torch.nn.Module):
    """`LSTIModel.long_term_vectors` computed so that a user's vector depends on that user's events alone, bit
    for bit: not on the other users in the batch, the padding, the order of users or the thread count.

    Why: the model's pooling runs matrix products over [batch, length] at once, and BLAS rounds a row
    differently with the shape of the product around it (measured: ~1e-7 differences between batch sizes), so a
    sharded run would not reproduce the unsharded vectors. Here everything that needs a product or a
    transcendental function is per item and computed once, in one canonical order (items sorted by id, one
    thread): the attention weight exp(logit - max) of each item and of each event type, and the item's value
    vector v(i) (`LSTIModel.long_values`, the model in eval mode as loaded). A user's vector is then the ratio
    of two sums taken in event order, in float64, of products of those per-item numbers: elementwise operations
    only, each exactly rounded (the value vectors are kept in float32, as the model computes them, and widened
    exactly per step). It equals the model's softmax pooling to float precision (shifting the logits by a global
    instead of the user's maximum changes nothing but the rounding; float64 keeps exp away from underflow).

    Same call as the model for `streams.batch.build.long_term_vectors` (`cfg`, `long_term_vectors(items,
    etypes, lengths)`); `digest` identifies the tables (the same catalogue, texts and weights give the same)."""

    def __init__(self, model: LSTIModel, item_ids: list[str]):
        super().__init__()
        self.cfg = model.cfg
        self._probe = torch.nn.Parameter(torch.zeros(0), requires_grad=False)  # for next(parameters()).device
        n = model.text.shape[0]
        if model.training:
            raise ValueError("LongTermPooling needs the model in eval mode (dropout off)")
        if len(item_ids) != n:
            raise ValueError(f"{len(item_ids)} item ids for {n} text rows")
        order = torch.tensor([0] + sorted(range(1, n), key=lambda c: item_ids[c]), dtype=torch.long)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                text = model.text.detach().cpu().float()[order].contiguous()
                logit = (torch.tanh(model.att_key(text)) @ model.att_query).double()
                values = model.long_values(order).float()
                type_logit = model.att_type.weight.detach().cpu()[:, 0].double()
                item_w = torch.exp(logit - logit[1:].max()) if n > 1 else torch.zeros(n, dtype=torch.float64)
                type_w = torch.exp(type_logit - type_logit[1:].max())
        finally:
            torch.set_num_threads(threads)
        item_w[0] = 0.0  # padding
        self.item_w = torch.empty_like(item_w)
        self.item_w[order] = item_w
        self.values = torch.empty_like(values)
        self.values[order] = values
        self.type_w = type_w
        self.default = model.long_default.detach().cpu().float().clone()
        h = hashlib.sha1()
        for t in (self.item_w, self.values, self.type_w, self.default):
            h.update(t.numpy().tobytes())
        h.update("\x1f".join(item_ids).encode("utf-8"))
        self.digest = h.hexdigest()

    @torch.no_grad()
    def long_term_vectors(self, items: torch.Tensor, etypes: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        items, etypes = items.cpu(), etypes.cpu()
        w = self.item_w[items] * self.type_w[etypes]  # [B, L] float64; 0 on padding
        num = torch.zeros(items.shape[0], self.values.shape[1], dtype=torch.float64)
        den = torch.zeros(items.shape[0], dtype=torch.float64)
        for t in range(items.shape[1]):  # in event order: the same additions whatever else is in the batch
            wt = w[:, t]
            num += wt[:, None] * self.values[items[:, t]].double()
            den += wt
        out = (num / den.clamp(min=1e-300)[:, None]).float()
        empty = lengths.cpu() == 0
        if empty.any():
            out[empty] = self.default
        return out


def read_item_changes(bootstrap: str, topic: str, timeout_s: float = 120.0) -> list:
    """Every record of the `items` topic from the beginning to its current end, parsed
    (streams.contracts.items.parse_item_change), in order per partition (an item's changes share a
    partition, its key). Malformed records are skipped with a warning. A missing topic reads as no change."""
    from kafka import KafkaConsumer, TopicPartition

    from streams.config import kafka_python_security_from_env
    from streams.contracts.items import BadItemMessage, parse_item_change

    cons = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, allow_auto_create_topics=False,
                         client_id="lsti-nightly-items", **kafka_python_security_from_env())
    out, bad = [], 0
    try:
        if topic not in cons.topics():
            log.info("items topic %s does not exist: no catalogue changes", topic)
            return []
        tps = [TopicPartition(topic, p) for p in sorted(cons.partitions_for_topic(topic) or [])]
        cons.assign(tps)
        cons.seek_to_beginning(*tps)
        end = cons.end_offsets(tps)
        last, moved = time.monotonic(), 0
        while any(cons.position(tp) < end[tp] for tp in tps):
            got = cons.poll(timeout_ms=500)
            for batch in got.values():
                for m in batch:
                    try:
                        out.append(parse_item_change(m.value))
                    except BadItemMessage as exc:
                        bad += 1
                        log.warning("items topic %s: skipped a malformed record at %d:%d: %s", topic, m.partition,
                                    m.offset, exc)
            now_at = sum(cons.position(tp) for tp in tps)
            if now_at != moved:
                moved, last = now_at, time.monotonic()
            elif time.monotonic() - last > timeout_s:
                raise TimeoutError(f"reading {topic}: no progress for {timeout_s:.0f}s at {now_at} of "
                                   f"{sum(end.values())} records")
    finally:
        cons.close()
    log.info("items topic %s: %d changes read (%d malformed skipped)", topic, len(out), bad)
    return out


def _item_status(base: Artifact, item_ids: list[str], updates: ItemUpdates | None) -> dict[str, list[str]]:
    """Deleted / unavailable item ids of the new catalogue: the base's record, updated by the `items` topic
    (which decides for every item it mentions)."""
    prior = base.manifest.get("item_status") or {}
    deleted, unavailable = set(prior.get("deleted", ())), set(prior.get("unavailable", ()))
    if updates is not None:
        said = updates.mentioned
        deleted = (deleted - said) | updates.deleted
        unavailable = (unavailable - said) | updates.unavailable
    known = set(item_ids[1:])
    return {"deleted": sorted(deleted & known), "unavailable": sorted(unavailable & known)}


def _users_digest(uids: list[str], seqs: list[Sequence]) -> str:
    """What a shard's vectors were computed from: its users and their (item code, type, time) sequences."""
    h = hashlib.sha1()
    h.update("\x1f".join(uids).encode("utf-8"))
    for s in seqs:
        for arr in (s.items, s.etypes, s.ts):
            h.update(np.ascontiguousarray(arr, np.int64).tobytes())
    return h.hexdigest()


def _write_dir_atomically(final: Path, files: dict[str, bytes]) -> None:
    """Write `files` into a temp folder beside `final`, then swap it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, blob in files.items():
        with open(tmp / name, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.asarray(arr, np.float32))
    return buf.getvalue()


def find_shards(paths: list[Path]) -> list[Path]:
    """Shard folders: each path is one (it holds shard.json) or a folder holding `shard-I-of-N` folders."""
    out = []
    for p in paths:
        p = Path(p)
        if (p / SHARD_FILE).exists():
            out.append(p)
        elif p.is_dir():
            out += sorted(d for d in p.glob("shard-*-of-*") if (d / SHARD_FILE).exists())
    return out


def _usable_shards(paths: list[Path], key: dict, digest_of) -> tuple[dict[int, Path], int | None, list[str]]:
    """The shard folders whose inputs are the merge's own: {i: folder}, their count n, and why others were
    not taken. `key` holds base/cutoff/tables; `digest_of(i, n)` is the users digest of shard i of n here."""
    found: dict[int, Path] = {}
    why: list[str] = []
    n_seen = None
    for d in find_shards(paths):
        try:
            meta = json.loads((d / SHARD_FILE).read_text())
        except (OSError, ValueError) as exc:
            why.append(f"{d}: unreadable {SHARD_FILE} ({exc})")
            continue
        bad = [k for k in key if meta.get(k) != key[k]]
        if bad:
            why.append(f"{d}: other inputs ({', '.join(bad)} differ)")
            continue
        i, n = int(meta["shard"]), int(meta["shards"])
        if n_seen is not None and n != n_seen:
            why.append(f"{d}: shard {i}/{n} of another split (n={n_seen} taken)")
            continue
        if meta.get("users_digest") != digest_of(i, n):
            why.append(f"{d}: computed from other events for its users (the data changed since)")
            continue
        n_seen = n
        found[i] = d
    return found, n_seen, why


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


def default_shards_dir(root: Path) -> Path:
    return Path(root) / ".nightly-shards"


def start_of_utc_day(now: float | None = None) -> int:
    """Epoch seconds of the last UTC midnight: the default cutoff of an archive run, so that every shard and
    the merge of one night read the same (complete) days however long they take."""
    now = time.time() if now is None else now
    return int(now // 86400 * 86400)


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
    archive: Path | None = None,
    item_changes: list | None = None,
    read_items_topic: bool = True,
    shard: tuple[int, int] | None = None,
    shards_dir: Path | None = None,
    merge_shards: list[Path] | None = None,
    wait_shards: float = 0.0,
) -> NightlyResult:
    """Build (and unless `publish` is False, publish) a new artifact from `base` for the history up to
    `cutoff`; `activate` (default: same as `publish`) makes it CURRENT once everything succeeded.

    `archive`: read the events from an `lsti archive` folder (instead of `dataset`/`events`). Catalogue
    changes: `item_changes` (ItemChange list), else the `items` topic read whole when `bootstrap` is given
    and `read_items_topic`. `shard=(i, n)`: compute the long-term vectors of shard i of n only, into
    `shards_dir` (default <root>/.nightly-shards); nothing is written to the artifacts or published.
    `merge_shards`: folders of shards (or shard folders) whose vectors to take, waiting up to `wait_shards`
    seconds for missing ones; the users of a shard still missing or computed from other inputs are computed
    here."""
    if shard is not None and merge_shards is not None:
        raise ValueError("a run either computes one shard or merges shards, not both")
    if shard is not None:
        publish, activate = False, False
    activate = publish if activate is None else activate
    if publish and not bootstrap:
        raise ValueError("publishing needs a Kafka bootstrap (or pass publish=False)")
    root = Path(root) if root else default_artifacts_dir()
    root.mkdir(parents=True, exist_ok=True)
    ph = _Phases()

    if item_changes is None and bootstrap and read_items_topic:
        from streams.config import Topics

        item_changes = read_item_changes(bootstrap, Topics.with_prefix(topic_prefix).items)
    updates = ItemUpdates.fold(item_changes) if item_changes is not None else None
    if data is None and archive is not None:
        cutoff = start_of_utc_day() if cutoff is None else cutoff
        data = read_archive(archive, updates, cutoff=cutoff)
    elif data is None:
        data = apply_item_updates(load_dataset(dataset, data_dir, events, items), updates)
    elif updates is not None:
        data = apply_item_updates(data, updates)
    data = history_until(data, cutoff)
    forgotten: dict[str, float] = {}
    if bootstrap and read_items_topic:
        from streams.config import Topics

        forgotten = read_forgotten(bootstrap, Topics.with_prefix(topic_prefix).forget)
        data = without_forgotten(data, forgotten)
    cutoff_ts = int(cutoff) if cutoff is not None else (int(data.ts.max()) if len(data.ts) else 0)
    ph.done("load_data")

    base_art = load_artifact(resolve_base(base, Path(root)), index_backend="faiss-cpu")
    base_model = base_art.model
    item_ids, remap = extend_catalogue(base_art, data)
    n_old = len(base_art.item_ids)
    ph.done("load_base")

    # Every text of the data's catalogue goes through the cache; only unseen texts reach BERT. An empty text
    # says nothing (the archive knows ids only): a known item keeps the base's vector, a new one is encoded
    # by its id as items without a text are elsewhere.
    encoder = _encoder(cache_dir)
    if encoder.dim != base_model.cfg.text_dim:
        raise BadArtifact(f"text encoder dimension {encoder.dim} != base model text_dim {base_model.cfg.text_dim}")
    blank = np.array([not t for t in data.item_texts[1:]], dtype=bool)
    rows = np.flatnonzero(~(blank & (remap[1:] < n_old)))
    fresh = encoder.encode([data.item_texts[r + 1] or f"item {data.item_ids[r + 1]}" for r in rows],
                           progress=progress)
    stats = dict(encoder.stats)
    text = torch.zeros(len(item_ids), base_model.cfg.text_dim)
    text[:n_old] = base_model.text
    new_codes = torch.from_numpy(remap[1:][rows])
    fresh_t = torch.from_numpy(fresh).reshape(len(rows), base_model.cfg.text_dim)
    known = new_codes < n_old
    diff = (fresh_t[known] - text[new_codes[known]]).abs().amax(dim=1) if known.any() else torch.zeros(0)
    changed = int((diff > CHANGED_ATOL).sum())
    take = ~known
    take[known] = diff > CHANGED_ATOL
    text[new_codes[take]] = fresh_t[take]
    ph.done("encode_texts")

    model = extend_model(base_model, text)
    pooling = LongTermPooling(model, item_ids)
    ph.done("build_model")

    active = [u for u in range(data.n_users) if data.user_offsets[u + 1] > data.user_offsets[u]]
    users = [data.user_ids[u] for u in active]
    seqs = []
    for u in active:
        sl = data.user_slice(u)
        seqs.append(Sequence(u, remap[data.items[sl]], data.etypes[sl], data.ts[sl]))
    work_root = Path(work_dir) if work_dir else root / ".nightly-work"
    shard_key = {"base": base_art.version, "weights_version": base_art.weights_version, "cutoff_ts": cutoff_ts,
                 "tables": pooling.digest}
    hashes = np.array([stable_hash(uid) for uid in users], dtype=np.uint64)

    def rows_of(i: int, n: int) -> np.ndarray:
        return np.flatnonzero(hashes % np.uint64(n) == np.uint64(i))

    def compute(rows: np.ndarray, tag: str) -> tuple[np.ndarray, int, int, Path]:
        """Long-term vectors of users[rows], in chunks saved under a work folder keyed by every input."""
        part = [seqs[r] for r in rows]
        key = hashlib.sha1("|".join([base_art.version, str(cutoff_ts), data_fingerprint(data), pooling.digest,
                                     hashlib.sha1(text.numpy().tobytes()).hexdigest(), str(chunk_users),
                                     tag]).encode())
        work = work_root / key.hexdigest()[:16]
        work.mkdir(parents=True, exist_ok=True)
        (work / "key.json").write_text(json.dumps({"base": base_art.version, "cutoff_ts": cutoff_ts,
                                                   "users": len(part), "chunk_users": chunk_users, "part": tag}))
        vecs, n_chunks, reused = _long_term_chunked(pooling, part, work, chunk_users, progress)
        return vecs, n_chunks, reused, work

    status = _item_status(base_art, item_ids, updates)
    counts = {"items": len(item_ids) - 1, "items_new": len(item_ids) - n_old, "items_changed": changed,
              "items_deleted": len(status["deleted"]), "items_unavailable": len(status["unavailable"]),
              "texts_encoded": int(stats["encoded"]), "texts_cached": int(stats["cached"]),
              "texts_kept": int(len(blank) - len(rows)), "users": len(users), "events": int(len(data.items))}

    if shard is not None:
        i, n = shard
        mine = rows_of(i, n)
        vecs, n_chunks, reused, work = compute(mine, f"shard {i}/{n}")
        ph.done("long_term")
        out = (Path(shards_dir) if shards_dir else default_shards_dir(root)) / f"shard-{i}-of-{n}"
        uids = [users[r] for r in mine]
        meta = {**shard_key, "shard": i, "shards": n, "users": len(uids), "users_all": len(users),
                "users_digest": _users_digest(uids, [seqs[r] for r in mine]), "created": time.time(),
                "data": data.label, "chunks": n_chunks, "chunks_reused": reused}
        _write_dir_atomically(out, {"users.json": json.dumps(uids).encode(), "long_term.npy": _npy_bytes(vecs),
                                    SHARD_FILE: json.dumps(meta, indent=2).encode()})
        shutil.rmtree(work, ignore_errors=True)
        ph.done("write")
        counts.update(shard=f"{i}/{n}", users=len(uids), users_all=len(users), chunks=n_chunks,
                      chunks_reused=reused)
        result = NightlyResult(out, f"shard-{i}-of-{n}", base_art.version, base_art.weights_version, counts)
        result.timings = ph.total()
        log.info("%s", result.summary())
        return result

    works: list[Path] = []
    used: list[Path] = []
    if merge_shards is not None:
        longs = np.zeros((len(users), model.cfg.dim), np.float32)

        digests: dict[tuple[int, int], str] = {}

        def digest_of(i: int, n: int) -> str:
            if (i, n) not in digests:
                r = rows_of(i, n)
                digests[i, n] = _users_digest([users[j] for j in r], [seqs[j] for j in r])
            return digests[i, n]

        paths = list(merge_shards) or [default_shards_dir(root)]
        deadline = time.monotonic() + max(0.0, wait_shards)
        while True:
            found, n, why = _usable_shards(paths, shard_key, digest_of)
            missing = [] if n is None else [i for i in range(n) if i not in found]
            if n is not None and not missing:
                break
            if time.monotonic() >= deadline:
                break
            log.info("waiting for shards (%s); %.0fs left", f"missing {missing} of {n}" if n else "none usable yet",
                     deadline - time.monotonic())
            time.sleep(min(10.0, max(0.1, deadline - time.monotonic())))
        for line in why:
            log.warning("shard not used: %s", line)
        if n is None:
            raise FileNotFoundError(f"no usable shard in {', '.join(map(str, paths))}"
                                    + (f" ({why[0]}; {len(why)} not used)" if why else "")
                                    + ": run `lsti nightly --shard I/N` first with the same inputs")
        n_chunks = reused = recomputed = 0
        for i in range(n):
            r = rows_of(i, n)
            if i in found:
                sh_users = json.loads((found[i] / "users.json").read_text())
                vecs = np.load(found[i] / "long_term.npy")
                if sh_users != [users[j] for j in r] or vecs.shape != (len(r), model.cfg.dim):
                    raise BadArtifact(f"{found[i]}: its users or vectors do not match its {SHARD_FILE}")
                meta = json.loads((found[i] / SHARD_FILE).read_text())
                n_chunks += int(meta.get("chunks", 0))
                reused += int(meta.get("chunks_reused", 0))
                used.append(found[i])
            else:
                log.warning("shard %d/%d: not usable, computing its %d users here", i, n, len(r))
                vecs, c, rr, work = compute(r, f"shard {i}/{n}")
                n_chunks, reused, recomputed = n_chunks + c, reused + rr, recomputed + len(r)
                works.append(work)
            longs[r] = vecs
        counts.update(shards=n, shards_used=len(used), users_recomputed=recomputed)
    else:
        longs, n_chunks, reused, work = compute(np.arange(len(users)), "all")
        works.append(work)
    counts.update(chunks=n_chunks, chunks_reused=reused)
    ph.done("long_term")

    index = item_index_for(model)
    ph.done("index")

    stem = f"{data.name}-{base_model.cfg.mode}-nightly"
    version = version or _next_version(root, stem)
    meta = {"weights_version": base_art.weights_version, "parent": base_art.version, "cutoff_ts": cutoff_ts,
            "nightly": True, "dataset": data.name, "mode": base_model.cfg.mode, "counts": counts,
            "texts_per_second": round(stats["encoded"] / stats["seconds"], 1) if stats["encoded"] else None,
            "timings": ph.total()}
    if status["deleted"] or status["unavailable"] or updates is not None:
        # Not to recommend (streams/contracts/items.py); deleted items keep their codes: histories name them.
        meta["item_status"] = status
    if data.source.get("kind") == "archive":
        meta["archive"] = {k: data.source[k] for k in ("files", "rows", "duplicates", "events")}
    for k in ("train", "train_info", "test_metrics"):  # what the weights were fitted and scored on
        if k in base_art.manifest:
            meta[f"base_{k}"] = base_art.manifest[k]
    meta["forgotten_users"] = len(forgotten)
    popularity = np.bincount(remap[data.items], minlength=len(item_ids))[: len(item_ids)]
    path = write_artifact(root, version, model, item_ids, index, users, longs, meta, popularity=popularity)
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
    for work in works:
        shutil.rmtree(work, ignore_errors=True)
    for d in used:  # merged into a version: tonight's shards are done
        shutil.rmtree(d, ignore_errors=True)
    result.timings = ph.total()
    log.debug("%s", result.summary())
    return result


def _bootstrap(args: argparse.Namespace, needed: bool) -> str | None:
    """The Kafka of this run: required when publishing (--bootstrap, LSTI_BOOTSTRAP or `lsti broker`'s),
    else only when given (--bootstrap or LSTI_BOOTSTRAP): then the `items` topic is read."""
    from streams.kafka.bootstrap import resolve_bootstrap

    if needed or getattr(args, "bootstrap", None) or os.environ.get("LSTI_BOOTSTRAP"):
        return resolve_bootstrap(args)
    return None


def main_nightly(args: argparse.Namespace) -> int:
    """Entry point of `lsti nightly` (argparse options as documented in the CLI)."""
    archive = getattr(args, "archive", None)
    if archive is not None and (args.events is not None or getattr(args, "dataset_given", False)):
        sys.exit("error: --archive reads the events of the archive: not with --events or --dataset")
    shard = getattr(args, "shard", None)
    merge = getattr(args, "merge_shards", None)
    if shard is not None and merge is not None:
        sys.exit("error: --shard computes one shard, --merge-shards merges them: give one of them")
    if shard is not None:
        try:
            shard = parse_shard(shard)
        except ValueError as e:
            sys.exit(f"error: --shard: {e}")
    bootstrap = _bootstrap(args, needed=shard is None and not args.no_publish)
    try:
        result = run_nightly(args.dataset, args.data_dir, args.events, args.items, base=args.base,
                             cutoff=args.cutoff, root=args.out, bootstrap=bootstrap,
                             topic_prefix=args.topic_prefix, publish=shard is None and not args.no_publish,
                             activate=True if getattr(args, "activate", False) else None, progress=not args.quiet,
                             archive=archive, read_items_topic=not getattr(args, "no_items_topic", False),
                             shard=shard, shards_dir=getattr(args, "shards_dir", None),
                             merge_shards=[Path(p) for p in merge] if merge is not None else None,
                             wait_shards=getattr(args, "wait_shards", 0.0) or 0.0)
    except (FileNotFoundError, BadArtifact) as e:
        sys.exit(f"error: {e}")
    print(result.summary(), file=sys.stderr)
    print(json.dumps({"version": result.version, "path": str(result.path), "counts": result.counts,
                      "timings": result.timings, "published": result.published, "current": result.activated}))
    return 0
