"""`python -m streams.bench.state --json`: what per-user state costs in RocksDB, and whether float16 would do.

(a) bytes per user of the state codec (streams/worker/state.py) with h and c in float32 and in float16;
(b) RocksDB on disk for N users (default 1M), written with rocksdict as a Faust table would (one `put`
    per user, raw bytes), with plain rocksdict options and with the options Faust opens its stores with
    (faust.stores.rocksdb.RocksDBOptions), then flushed and compacted: size, write time, random reads;
(c) quality cost of storing h and c as float16: every ml-1m test user's history is stepped through the
    current artifact's online model twice (float32, and rounded to float16 after every step as a stored
    state would be), and the final top-10 lists (recent 10 items excluded, as the worker does) compared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from streams.worker.state import HEADER, RECENT, StateBatch, StateCodec

DIM = 64
MODEL_VERSION = "bench-state"


def StateCodecF16(dim: int, model_version: str) -> StateCodec:  # noqa: N802 (reads like the class it builds)
    """The float16 variant of the state codec (h and c as float16, format byte FORMAT16)."""
    return StateCodec(dim, model_version, np.float16)


def _record_dtype(dim: int, hc: str) -> np.dtype:
    """The codec's byte layout as a packed numpy record, to encode 1M states without a Python loop."""
    return np.dtype([("fmt", "u1"), ("n", "u1"), ("res", "<u2"), ("tag", "<u4"), ("part", "<i4"), ("off", "<i8"),
                     ("ts", "<f8"), ("count", "<u4"), ("h", hc, (dim,)), ("c", hc, (dim,)),
                     ("recent", "<i4", (RECENT,)), ("ids", "<u8", (RECENT,))])


def synthetic_states(n: int, dim: int, n_items: int, seed: int) -> StateBatch:
    """LSTM-like h (o*tanh c) and c, Zipf recent items, event-id hashes, per-user counts and offsets."""
    rng = np.random.default_rng(seed)
    c = rng.normal(0.0, 1.2, (n, dim)).astype(np.float32)
    o = 1.0 / (1.0 + np.exp(-rng.normal(0.0, 1.5, (n, dim))))
    h = (o * np.tanh(c)).astype(np.float32)
    count = np.minimum(np.exp(rng.normal(3.0, 1.3, n)).astype(np.int64) + 1, 100_000)  # lognormal activity
    ranks = rng.zipf(1.2, (n, RECENT))
    recent = (np.where(ranks <= n_items, ranks, rng.integers(1, n_items + 1, (n, RECENT)))).astype(np.int32)
    ids = rng.integers(1, 2**63, (n, RECENT), dtype=np.uint64)
    filled = np.arange(RECENT)[None, :] >= RECENT - np.minimum(count, RECENT)[:, None]  # most recent last
    recent[~filled] = 0
    ids[~filled] = 0
    return StateBatch(h=h, c=c, recent=recent, recent_ids=ids, last_partition=rng.integers(0, 8, n).astype(np.int32),
                      last_offset=rng.integers(0, 50_000_000, n).astype(np.int64),
                      last_ts=1.7e9 + rng.uniform(0, 3e7, n), count=count)


def encode_all(codec: StateCodec, s: StateBatch, fp16: bool) -> np.ndarray:
    """[n] fixed-size byte records equal to codec.encode_one for every user (checked on a sample)."""
    n = len(s.h)
    rec = np.zeros(n, _record_dtype(codec.dim, "<f2" if fp16 else "<f4"))
    rec["fmt"] = codec.format
    rec["n"], rec["tag"] = RECENT, codec.tag
    rec["part"], rec["off"], rec["ts"], rec["count"] = s.last_partition, s.last_offset, s.last_ts, s.count
    rec["h"], rec["c"], rec["recent"], rec["ids"] = s.h, s.c, s.recent, s.recent_ids
    assert rec.dtype.itemsize == codec.size, (rec.dtype.itemsize, codec.size)
    for r in (0, 1, n // 2, n - 1):
        assert rec[r].tobytes() == codec.encode_one(s, r), "vectorised encoding differs from the codec"
    return rec


# -------------------------------------------------------------------------------------- (a) + (b)


def codec_sizes(dim: int) -> dict:
    s32, s16 = StateCodec(dim, MODEL_VERSION), StateCodecF16(dim, MODEL_VERSION)
    st = synthetic_states(4, dim, 1000, 0)
    for codec in (s32, s16):  # round trip, so the variant is a real codec and not just arithmetic
        back = codec.decode([codec.encode_one(st, r) for r in range(4)])
        tol = 0 if codec is s32 else 1e-3
        assert np.allclose(back.h, st.h, atol=tol) and np.array_equal(back.recent_ids, st.recent_ids)
    return {"dim": dim, "header": HEADER.size, "recent_items": 4 * RECENT, "recent_event_ids": 8 * RECENT,
            "float32": {"h_c": 8 * dim, "total": s32.size},
            "float16": {"h_c": 4 * dim, "total": s16.size},
            "saving": round(1 - s16.size / s32.size, 3)}


def _open(path: Path, kind: str):
    import rocksdict

    if kind == "faust":
        from faust.stores.rocksdb import RocksDBOptions

        return RocksDBOptions(use_rocksdict=True).open(path)  # exactly how a Faust table opens its store
    opts = rocksdict.Options(raw_mode=True)  # Faust's raw mode; every other option at rocksdict's default
    opts.create_if_missing(True)
    return rocksdict.Rdict(str(path), options=opts)


def _du(path: Path) -> dict:
    apparent = allocated = sst = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(root, f))
            apparent += st.st_size
            allocated += st.st_blocks * 512
            if f.endswith(".sst"):
                sst += st.st_size
    return {"apparent_bytes": apparent, "du_bytes": allocated, "sst_bytes": sst}


def _options_summary(path: Path) -> dict:
    """A few effective settings from the OPTIONS file RocksDB writes (what was really used), by section."""
    files = sorted(path.glob("OPTIONS-*"))
    want = ("compression", "write_buffer_size", "max_write_buffer_number", "target_file_size_base",
            "max_open_files", "block_size", "filter_policy", "block_cache", "whole_key_filtering")
    out: dict[str, str] = {}
    section = ""
    if files:
        for line in files[-1].read_text().splitlines():
            line = line.strip()
            if line.startswith("["):
                section = line.strip("[]").split()[0].split("/")[-1]
                continue
            k, _, v = line.partition("=")
            if v and any(k == w or k.startswith(w) for w in want):
                out[f"{section}.{k}"] = v
    return out


def rocksdb_case(root: Path, kind: str, keys: list[bytes], values: np.ndarray, reads: int, seed: int,
                 log) -> dict:
    path = root / f"{kind}-{values.dtype.itemsize}"
    shutil.rmtree(path, ignore_errors=True)
    db = _open(path, kind)
    order = np.random.default_rng(seed).permutation(len(keys))  # users arrive in no particular order
    t0 = time.perf_counter()
    for i in order:
        db.put(keys[i], values[i].tobytes())
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    db.flush()
    flush_s = time.perf_counter() - t0
    before = _du(path)
    t0 = time.perf_counter()
    db.compact_range(None, None)
    compact_s = time.perf_counter() - t0
    n_keys = db.property_int_value("rocksdb.estimate-num-keys")
    db.close()
    after = _du(path)
    db = _open(path, kind)
    rng = np.random.default_rng(seed + 1)
    pick = rng.integers(0, len(keys), reads)
    t0 = time.perf_counter()
    got = [db.get(keys[i]) for i in pick]
    read_s = time.perf_counter() - t0
    assert all(g == values[i].tobytes() for g, i in zip(got[:100], pick[:100], strict=True))
    t0 = time.perf_counter()
    for s in range(0, reads, 1000):  # a micro-batch's users in one call (rocksdict multi-get)
        db.get([keys[i] for i in pick[s : s + 1000]])
    multi_s = time.perf_counter() - t0
    db.close()
    row = {"options": kind, "value_bytes": int(values.dtype.itemsize), "users": len(keys),
           "estimate_num_keys": n_keys, "write_puts_s": round(write_s, 2),
           "puts_per_s": round(len(keys) / write_s), "flush_s": round(flush_s, 2), "compact_s": round(compact_s, 2),
           "before_compaction": before, "after_compaction": after,
           "du_bytes_per_user": round(after["du_bytes"] / len(keys), 1),
           "sst_bytes_per_user": round(after["sst_bytes"] / len(keys), 1),
           "random_gets": reads, "get_us": round(1e6 * read_s / reads, 2),
           "multiget_1000_us_per_key": round(1e6 * multi_s / reads, 2), "effective_options": _options_summary(path)}
    log(f"  {kind:<8} {row['value_bytes']} B/value: write {write_s:.1f}s ({row['puts_per_s']:,}/s), compact "
        f"{compact_s:.1f}s, du {after['du_bytes'] / 2**20:.1f} MiB ({row['du_bytes_per_user']} B/user, sst "
        f"{row['sst_bytes_per_user']}), get {row['get_us']} us, multi-get {row['multiget_1000_us_per_key']} us/key")
    shutil.rmtree(path, ignore_errors=True)
    return row


def rocksdb_bench(n_users: int, reads: int, root: Path, seed: int, log) -> dict:
    s = synthetic_states(n_users, DIM, 100_000, seed)
    keys = [str(u).encode() for u in range(1, n_users + 1)]  # message key = user_id as UTF-8, as the worker
    c32, c16 = StateCodec(DIM, MODEL_VERSION), StateCodecF16(DIM, MODEL_VERSION)
    v32, v16 = encode_all(c32, s, False), encode_all(c16, s, True)
    key_bytes = sum(len(k) for k in keys)
    raw = {"float32": key_bytes + len(keys) * v32.dtype.itemsize, "float16": key_bytes + len(keys) * v16.dtype.itemsize}
    rows = []
    for kind in ("default", "faust"):
        for values in (v32, v16):
            rows.append(rocksdb_case(root, kind, keys, values, reads, seed, log))
    # Changelog recovery path: Faust restores a table with rocksdict WriteBatches per partition.
    import rocksdict

    path = root / "faust-restore"
    db = _open(path, "faust")
    t0 = time.perf_counter()
    for b in range(0, n_users, 1000):
        wb = rocksdict.WriteBatch(raw_mode=True)
        for i in range(b, min(b + 1000, n_users)):
            wb.put(keys[i], v32[i].tobytes())
        db.write(wb)
    restore_s = time.perf_counter() - t0
    db.close()
    shutil.rmtree(path, ignore_errors=True)
    log(f"  faust restore (WriteBatch of 1000, float32): {restore_s:.1f}s")
    return {"users": n_users, "key": "user id as UTF-8 digits (1..N), written in random order",
            "raw_key_plus_value_bytes": raw, "cases": rows,
            "faust_restore_writebatch1000_float32_s": round(restore_s, 2),
            "state_model": "h = sigmoid(N(0,1.5)) * tanh(c), c ~ N(0,1.2); recent items Zipf(1.2) over 100k codes; "
                           "event-id hashes random uint64; per-user event count lognormal (fewer than 10 -> zeros)"}


# ---------------------------------------------------------------------------------------------- (c)


def fp16_quality(root: Path | None, log) -> dict:
    """Step every ml-1m test history through the artifact twice (float32 vs float16 state) and compare top-10."""
    from encoders.data import load_dataset
    from encoders.split import LeaveOneOut
    from streams.artifacts import current_version, default_artifacts_dir, load_artifact

    root = root or default_artifacts_dir()
    version = current_version(root)
    if not version or not (root / version).exists():
        return {"skipped": f"no artifact under {root}"}
    t0 = time.perf_counter()
    art = load_artifact(root / version, index_backend="faiss-cpu", index_threads=1)
    if art.manifest.get("dataset") != "ml-1m":
        return {"skipped": f"current artifact {version} is not ml-1m"}
    data = load_dataset("ml-1m")
    cases = LeaveOneOut(data).cases("test")
    load_s = time.perf_counter() - t0
    code = {iid: i for i, iid in enumerate(art.item_ids) if i}
    to_art = np.array([code.get(iid, 0) if i else 0 for i, iid in enumerate(data.item_ids)], np.int64)
    long_users, long_vecs = art.long_term()
    long_row = {u: r for r, u in enumerate(long_users)}
    online = art.online

    n = len(cases)
    lens = np.array([len(c.history.items) for c in cases])
    L = int(lens.max())
    items = np.zeros((n, L), np.int64)
    etypes = np.zeros((n, L), np.int64)
    ts = np.zeros((n, L), np.float64)
    for r, c in enumerate(cases):
        m = lens[r]
        items[r, :m], etypes[r, :m], ts[r, :m] = to_art[c.history.items], c.history.etypes, c.history.ts
    unknown = int((items[np.arange(L)[None, :] < lens[:, None]] == 0).sum())
    targets = to_art[np.array([c.target for c in cases])]
    long = np.stack([long_vecs[long_row[data.user_ids[c.history.user]]]
                     if data.user_ids[c.history.user] in long_row else online.long_default for c in cases])

    t1 = time.perf_counter()
    h32 = np.zeros((n, online.dim), np.float32)
    c32 = np.zeros_like(h32)
    h16, c16 = h32.copy(), c32.copy()
    last_gap = np.zeros(n)
    for i in range(L):  # step i: every user's i-th event in one call
        rows = np.flatnonzero(lens > i)
        gaps = ts[rows, i] - ts[rows, i - 1] if i else np.zeros(len(rows))
        first = np.full(len(rows), i == 0)
        args = (items[rows, i], etypes[rows, i], gaps, first)
        h32[rows], c32[rows] = online.step(h32[rows], c32[rows], *args)
        h, c = online.step(h16[rows], c16[rows], *args)
        h16[rows] = h.astype(np.float16).astype(np.float32)  # what a float16 state would read back
        c16[rows] = c.astype(np.float16).astype(np.float32)
        last_gap[rows] = gaps
    step_s = time.perf_counter() - t1

    recent = [items[r, max(0, lens[r] - RECENT) : lens[r]] for r in range(n)]
    recent = [x[x > 0] for x in recent]
    tops, uvecs = {}, {}
    for name, h in (("float32", h32), ("float16", h16)):
        u, _gate = online.user_vectors(h, long, last_gap, lens)
        _s, tops[name] = art.index.search(u, 10, exclude=recent)
        uvecs[name] = u
    a, b = tops["float32"], tops["float16"]
    overlap = np.array([len(np.intersect1d(a[r], b[r])) / 10 for r in range(n)])
    hr = {k: round(float(np.mean([targets[r] in v[r] for r in range(n)])), 4) for k, v in tops.items()}
    out = {
        "artifact": version, "model_mode": art.model.cfg.mode, "dim": online.dim, "test_users": n,
        "events_stepped": int(lens.sum()), "max_history": L, "unknown_items_in_histories": unknown,
        "top10_overlap_mean": round(float(overlap.mean()), 5),
        "top10_overlap_min": round(float(overlap.min()), 2),
        "top10_same_set_fraction": round(float((overlap == 1).mean()), 4),
        "top10_same_order_fraction": round(float(np.all(a == b, axis=1).mean()), 4),
        "hr@10": hr, "hits_float32": int(round(hr["float32"] * n)), "hits_float16": int(round(hr["float16"] * n)),
        "final_h_max_abs_diff": float(np.abs(h32 - h16).max()),
        "final_c_max_abs_diff": float(np.abs(c32 - c16).max()),
        "user_vector_rel_diff_mean": float(np.mean(np.linalg.norm(uvecs["float32"] - uvecs["float16"], axis=1)
                                                   / np.linalg.norm(uvecs["float32"], axis=1))),
        "exclusion": f"the user's last {RECENT} history items (as the worker does; offline eval masks all history)",
        "load_s": round(load_s, 1), "step_s": round(step_s, 1),
    }
    log(f"  fp16 quality: {n} users, {out['events_stepped']} events, overlap {out['top10_overlap_mean']}, "
        f"same set {out['top10_same_set_fraction']}, HR@10 fp32 {hr['float32']} fp16 {hr['float16']} "
        f"({step_s:.1f}s stepping)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--reads", type=int, default=100_000)
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder for the databases (default: a temp dir)")
    ap.add_argument("--artifacts", type=Path, default=None)
    ap.add_argument("--skip", choices=["rocksdb", "quality"], nargs="*", default=[])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    import faust
    import rocksdict

    t0 = time.perf_counter()
    report: dict = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                "python": platform.python_version(), "rocksdict": _version("rocksdict", rocksdict),
                                "faust": getattr(faust, "__version__", "?"),
                                "loadavg_at_start": list(os.getloadavg())}}
    report["codec"] = codec_sizes(DIM)
    log(f"codec at dim {DIM}: float32 {report['codec']['float32']['total']} B, "
        f"float16 {report['codec']['float16']['total']} B per user")
    if "rocksdb" not in args.skip:
        scratch = Path(tempfile.mkdtemp(prefix="lsti-bench-state-", dir=args.dir))
        try:
            report["rocksdb"] = rocksdb_bench(args.users, args.reads, scratch, args.seed, log)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    if "quality" not in args.skip:
        report["fp16_quality"] = fp16_quality(args.artifacts, log)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    log(f"total {report['total_s']} s")
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


def _version(dist: str, module) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except ImportError:  # informational only
        return getattr(module, "__version__", "?")


if __name__ == "__main__":
    raise SystemExit(main())
