"""The nightly step reads what the stream saw: `lsti archive` (events topic -> date-partitioned Parquet) on
the real embedded Kafka, exactly the published valid events back, across a crash between a file's rename
and its commit and across SIGKILLs of the CLI; `lsti nightly --archive` gives the long-term vectors of the
same events read from a file, bit for bit; and `--shard i/n` + `--merge-shards` equals the unsharded run
bit for bit."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from streams.config import REPO, Topics
from streams.contracts.events import event_json
from streams.contracts.items import ItemChange, item_change_json
from streams.kafka.tools import ensure_topics, normalise, publish, publish_raw

NEW_ITEMS = {"n0": "A space opera sequel set on a frozen moon", "n1": "A crime thriller about a diamond heist"}
BAD = [(b"u1", b"{not json"), (b"someone-else", event_json("b1", "u1", "i1", "view", 1_600_000_000)),
       (b"u2", b'{"event_id":"b2","user_id":"u2","item_id":"i1","event_type":"like","ts":1600000000}')]


def wait_progress(measure, done, what: str, idle: float = 60.0, poll: float = 0.1) -> None:
    """Wait until done(); fail only when measure() has not moved for `idle` seconds."""
    last, since = None, time.time()
    while not done():
        value = measure()
        if value != last:
            last, since = value, time.time()
        elif time.time() - since > idle:
            raise AssertionError(f"no progress for {idle:.0f}s waiting for {what} (at {value})")
        time.sleep(poll)


def archived_rows(folder: Path) -> list[dict]:
    """Every row of every Parquet file (no dedupe), with its file."""
    import pyarrow.parquet as pq

    from encoders.data import archive_files

    out = []
    for f in archive_files(folder):
        for r in pq.read_table(f).to_pylist():
            out.append({**r, "file": f})
    return out


def event_key(r: dict) -> tuple:
    return (r["event_id"], str(r["user_id"]), str(r["item_id"]), r["event_type"], float(r["ts"]))


def published_keys(records: list[dict]) -> Counter:
    return Counter(event_key(json.loads(normalise(r))) for r in records)


def unique_rows(folder: Path) -> Counter:
    """The archive's events, each (partition, offset) once."""
    seen = {}
    for r in archived_rows(folder):
        seen.setdefault((r["partition"], r["offset"]), r)
    return Counter(event_key(r) for r in seen.values())


def write_events_csv(path: Path, records: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "event_type", "ts"])
        w.writerows([r["user_id"], r["item_id"], r["event_type"], r["ts"]] for r in records)
    return path


@pytest.fixture
def stream(fixture_files):
    """Events of 24 fixture users in time order, plus events naming the new items and one item with no text."""
    events, _ = fixture_files
    rows = [r for r in csv.DictReader(open(events)) if int(r["user_id"][1:]) < 24]
    last = max(int(r["ts"]) for r in rows)
    rows += [{"user_id": "u0", "item_id": "n0", "event_type": "view", "ts": str(last + 10)},
             {"user_id": "u1", "item_id": "n1", "event_type": "click", "ts": str(last + 20)},
             {"user_id": "u_new", "item_id": "n1", "event_type": "view", "ts": str(last + 30)},
             {"user_id": "u_new", "item_id": "n9", "event_type": "buy", "ts": str(last + 40)},
             {"user_id": "u2", "item_id": "i7", "event_type": "view", "ts": str(last + 50)}]
    return sorted(rows, key=lambda r: int(r["ts"]))


@pytest.mark.integration
def test_archive_round_trip_then_nightly_equals_the_file_run(kafka, namespace, tiny_artifact, fixture_files, stream,
                                                             tmp_path, monkeypatch, capsys):
    from streams.artifacts import load_artifact
    from streams.batch.nightly import main_nightly, run_nightly
    from streams.cli.main import add_nightly_args
    from streams.jobs.archive import read_archive, run_archive

    topics = Topics.with_prefix(namespace["prefix"])
    ensure_topics(kafka, 4, topics)
    publish(kafka, stream, topic=topics.events, progress=False)
    publish_raw(kafka, BAD, topics.events)
    changes = [ItemChange("n0", text=NEW_ITEMS["n0"]), ItemChange("n1", text=NEW_ITEMS["n1"]),
               ItemChange("i7", deleted=True), ItemChange("i8", available=False), ItemChange("i9", available=False),
               ItemChange("i9", available=True)]
    publish_raw(kafka, [(c.item_id.encode(), item_change_json(c)) for c in changes] + [(b"x", b"[1]")], topics.items)

    out = tmp_path / "archive"
    stats = run_archive(kafka, out, namespace["prefix"], group=namespace["app_id"] + "-archive", until_idle=2.0,
                        file_events=100)
    assert stats.bad == len(BAD) and stats.events == len(stream) and stats.records == len(stream) + len(BAD)

    # Exactly the published valid events, each once; files named by partition and first offset, by event date.
    rows = archived_rows(out)
    assert len({(r["partition"], r["offset"]) for r in rows}) == len(rows) == len(stream)
    assert unique_rows(out) == published_keys(stream)
    for f in {r["file"] for r in rows}:
        mine = [r for r in rows if r["file"] == f]
        assert f.name == f"part-{mine[0]['partition']}-{min(r['offset'] for r in mine)}.parquet"
        days = {time.strftime("%Y-%m-%d", time.gmtime(r["ts"])) for r in mine}
        assert days == {f.parent.name.removeprefix("date=")}
    data = read_archive(out)
    assert len(data.items) == len(stream) and data.source["duplicates"] == 0
    assert not list(out.rglob(".part-*"))

    # Nightly from the archive (+ the items topic, through the CLI options) vs nightly from the same events in a
    # file (+ an items file).
    monkeypatch.setenv("LSTI_CACHE", str(tmp_path / "cache"))
    p = argparse.ArgumentParser()
    add_nightly_args(p)
    args = p.parse_args(["--archive", str(out), "--bootstrap", kafka, "--topic-prefix", namespace["prefix"], "--base",
                         str(tiny_artifact), "--out", str(tmp_path / "a"), "--no-publish", "-q"])
    assert main_nightly(args) == 0
    from_archive = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    common = dict(base=tiny_artifact, publish=False, progress=False, cache_dir=tmp_path / "cache")
    items = tmp_path / "items.jsonl"
    items.write_text(Path(fixture_files[1]).read_text()
                     + "".join(json.dumps({"item_id": k, "text": v}) + "\n" for k, v in NEW_ITEMS.items()))
    from_file = run_nightly(dataset=None, events=write_events_csv(tmp_path / "events.csv", stream), items=items,
                            item_changes=[], root=tmp_path / "f", work_dir=tmp_path / "wf", **common)
    a, f = load_artifact(Path(from_archive["path"])), load_artifact(from_file.path)
    ua, va = a.long_term()
    uf, vf = f.long_term()
    assert sorted(ua) == sorted(uf) and len(ua) == 25 and "u_new" in ua
    fv = dict(zip(uf, vf, strict=True))
    assert all(np.array_equal(v, fv[u]) for u, v in zip(ua, va, strict=True)), "long-term vectors differ"
    assert from_archive["counts"]["texts_kept"] > 0  # the archive has no texts: the base's vectors were kept

    # The catalogue: new items with their topic text, known codes kept (the deleted item too), status recorded.
    base = load_artifact(tiny_artifact)
    assert a.item_ids[: len(base.item_ids)] == base.item_ids and {"n0", "n1", "n9"} <= set(a.item_ids)
    assert a.manifest["item_status"] == {"deleted": ["i7"], "unavailable": ["i8"]}
    assert a.manifest["counts"]["items_deleted"] == 1 and a.manifest["archive"]["events"] == len(stream)
    assert sorted(a.item_ids) == sorted(f.item_ids)


@pytest.mark.integration
def test_archive_crash_and_sigkill_lose_nothing_and_duplicate_nothing(kafka, namespace, tmp_path):
    from streams.jobs.archive import Archiver, read_archive

    topics = Topics.with_prefix(namespace["prefix"])
    ensure_topics(kafka, 4, topics)
    rng = random.Random(7)
    records = [{"event_id": f"e{j}", "user_id": f"u{rng.randrange(40)}", "item_id": f"i{rng.randrange(50)}",
                "event_type": rng.choice(["view", "click", "buy"]), "ts": 1_600_000_000 + j * 500} for j in range(900)]
    chunks = [records[:300], records[300:600], records[600:]]
    group, out = namespace["app_id"] + "-archive", tmp_path / "archive"
    publish(kafka, chunks[0], topic=topics.events, progress=False)

    # 1. A crash after the third flush's files are in place, before its commit (deterministic).
    class Crash(Exception):
        pass

    flushed: list[list[Path]] = []

    def crash_on_third(paths):
        flushed.append(paths)
        if len(flushed) == 3:
            raise Crash

    with pytest.raises(Crash):
        Archiver(kafka, out, topics.events, group, file_events=40, session_timeout=2.0,
                 after_write=crash_on_third).run(until_idle=5.0)
    uncommitted = flushed[2]
    assert uncommitted and all(p.exists() for p in uncommitted)
    import pyarrow.parquet as pq

    # What the crashed flush held: (partition, offset) pairs that step 2 must read and write again.
    unconfirmed = {(int(pt), int(off)) for path in uncommitted
                   for pt, off in zip(*pq.read_table(path, columns=["partition", "offset"]).to_pydict().values(),
                                      strict=True)}

    # 2. The CLI, SIGKILLed mid-stream twice (a new chunk published before each run), then run until idle.
    env = {**os.environ, "PYTHONPATH": str(REPO), "LSTI_SESSION_TIMEOUT": "2", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "streams.cli", "archive", "--bootstrap", kafka, "--out", str(out), "--topic-prefix",
           namespace["prefix"], "--group", group, "--file-events", "10"]
    logs = []

    def files() -> int:
        return len(list(out.glob("date=*/part-*.parquet")))

    def start(extra: list[str], name: str):
        log = tmp_path / f"{name}.log"
        logs.append(log)
        return subprocess.Popen(cmd + extra, env=env, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)

    for k, chunk in enumerate(chunks[1:]):
        publish(kafka, chunk, topic=topics.events, progress=False)
        proc = start([], f"killed{k}")
        log = logs[-1]
        wait_progress(lambda log=log: log.read_text(), lambda log=log: log.read_text().count("wrote ") >= 3,
                      "the archive to write")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = start(["--until-idle", "3"], "final")
    wait_progress(lambda: (files(), logs[-1].read_text()), lambda: proc.poll() is not None, "the archive to finish")
    assert proc.returncode == 0, logs[-1].read_text()
    summary = json.loads(proc.stdout.read().strip().splitlines()[-1])
    assert summary["bad"] == 0

    # Everything once: the crashed flush's records were read and written again (under the same names when the
    # re-read starts where it did; from an earlier commit when one of step 1's commits failed under load, in
    # files with other boundaries, which the reader counts once), nothing lost.
    written = "".join(p.read_text() for p in logs)
    rewritten = {(int(pt), off) for pt, lo, hi in re.findall(r"wrote \S+: \d+ events of partition (\d+) "
                                                             r"\(offsets (\d+)\.\.(\d+)\)", written)
                 for off in range(int(lo), int(hi) + 1)}
    assert unconfirmed <= rewritten, (sorted(unconfirmed - rewritten)[:20], written[-2000:])
    assert unique_rows(out) == published_keys(records)
    data = read_archive(out)
    assert len(data.items) == len(records) and data.source["events"] == len(records)

    # A file repeating offsets of another (a re-write with other boundaries) is counted once by the reader.
    some = sorted(out.glob("date=*/part-*.parquet"))[0]
    twin = some.with_name(some.name.replace(".parquet", "") + "9.parquet")
    twin.write_bytes(some.read_bytes())
    again = read_archive(out)
    assert len(again.items) == len(records) and again.source["duplicates"] > 0
    (some.parent / ".part-0-0.parquet.host.1.tmp").write_bytes(b"half a file")  # a crashed write: never read
    assert len(read_archive(out).items) == len(records)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sharded_nightly_merges_to_the_unsharded_artifact_bit_for_bit(tiny_artifact, fixture_files, tmp_path,
                                                                     monkeypatch):
    from streams.artifacts import load_artifact
    from streams.batch.nightly import main_nightly, run_nightly, stable_hash
    from streams.cli.main import add_nightly_args

    events, items = fixture_files
    root = tmp_path / "art"
    common = dict(dataset=None, events=events, items=items, base=tiny_artifact, publish=False, progress=False,
                  cache_dir=tmp_path / "cache", work_dir=tmp_path / "work", root=root)
    whole = run_nightly(**common)

    # Shard 0 of 3 through the CLI options, the others through the function.
    p = argparse.ArgumentParser()
    add_nightly_args(p)
    args = p.parse_args(["--events", str(events), "--items", str(items), "--base", str(tiny_artifact), "--out",
                         str(root), "--no-publish", "--no-items-topic", "--shard", "0/3", "-q"])
    monkeypatch.setenv("LSTI_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LSTI_BOOTSTRAP", raising=False)
    assert main_nightly(args) == 0
    shards = [run_nightly(**common, shard=(i, 3)) for i in (1, 2)]
    shard_dir = root / ".nightly-shards"
    sizes = [len(json.loads((shard_dir / f"shard-{i}-of-3" / "users.json").read_text())) for i in range(3)]
    assert sum(sizes) == whole.counts["users"] and all(sizes) and shards[0].counts["shard"] == "1/3"
    for i in range(3):
        assert all(stable_hash(u) % 3 == i for u in json.loads((shard_dir / f"shard-{i}-of-3/users.json").read_text()))

    merged = run_nightly(**common, merge_shards=[shard_dir])
    assert merged.counts["shards_used"] == 3 and merged.counts["users_recomputed"] == 0
    for name in ("users.json", "long_term.npy", "items.json", "index.faiss"):
        assert _digest(merged.path / name) == _digest(whole.path / name), name
    sa = load_artifact(merged.path).model.state_dict()
    sb = load_artifact(whole.path).model.state_dict()
    assert all(np.array_equal(sa[k].numpy(), sb[k].numpy()) for k in sb)
    assert not list(shard_dir.glob("shard-*"))  # merged: tonight's shards are done

    # A shard computed from other events (here: another cutoff) is not taken: its users are computed by the merge.
    cutoff = int(max(int(r["ts"]) for r in csv.DictReader(open(events)))) - 3600
    run_nightly(**{**common, "cutoff": cutoff}, shard=(0, 2))
    run_nightly(**common, shard=(1, 2))
    mixed = run_nightly(**common, merge_shards=[])
    assert mixed.counts["shards_used"] == 1 and mixed.counts["users_recomputed"] > 0
    assert _digest(mixed.path / "long_term.npy") == _digest(whole.path / "long_term.npy")


def test_k8s_archive_deployment_and_indexed_nightly():
    """deploy/k8s/archive/ (outside the main kustomization, which tests/test_deploy.py checks) and the Indexed
    Job: commands parse with the real CLI, volumes exist, N agrees between completions and --shard."""
    import yaml
    from test_deploy import check_lsti_args, lsti_invocations

    k8s = REPO / "deploy" / "k8s"
    kust = yaml.safe_load((k8s / "archive" / "kustomization.yaml").read_text())
    assert kust["resources"] == ["archive-deployment.yaml"]
    pvcs = {d["metadata"]["name"]: d for d in yaml.safe_load_all((k8s / "artifacts-pvc.yaml").read_text())}
    assert pvcs["lsti-archive"]["spec"]["accessModes"] == ["ReadWriteMany"]
    dep = yaml.safe_load((k8s / "archive" / "archive-deployment.yaml").read_text())
    pod = dep["spec"]["template"]["spec"]
    assert dep["metadata"]["namespace"] == "lsti" and pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == \
        "lsti-archive"
    [call] = lsti_invocations(pod["containers"][0]["command"])
    assert check_lsti_args(call, "archive Deployment") == "archive" and call[call.index("--out") + 1] == "/archive"

    shard_job, merge_job = yaml.safe_load_all((k8s / "nightly-cronjob.yaml").read_text())
    job = shard_job["spec"]["jobTemplate"]["spec"]
    assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"]
    [call] = lsti_invocations(job["template"]["spec"]["containers"][0]["command"])
    assert call[call.index("--shard") + 1] == "${JOB_COMPLETION_INDEX}/" + str(job["completions"])
    [merge] = lsti_invocations(merge_job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"])
    assert check_lsti_args(merge, "merge CronJob") == "nightly" and "--merge-shards" in merge and "--archive" in merge
