"""`lsti bench model` runs end to end on a tiny workload and reports what BENCHMARKS.md quotes."""

from streams.bench.model import run
from streams.bench.stream import parsed_batches


def test_bench_model_reports_process_and_search_per_batch_size(tmp_path, monkeypatch):
    monkeypatch.setenv("LSTI_HOME", str(tmp_path))
    out = run(n=400, n_users=50, n_items=2000, dim=16, partitions=4, sizes=[5, 100], repeat=1, search=True)
    assert [r["batch"] for r in out["process"]] == [5, 100]
    assert all(r["us_per_event"] > 0 and r["events"] > 0 for r in out["process"])
    assert all(s["faiss-cpu_us_per_query"] > 0 and s["blas_us_per_query"] > 0 for s in out["search"])


def test_batches_keep_one_partition_per_batch_and_every_event_once():
    from streams.bench.stream import _messages, zipf_stream

    msgs = list(_messages(*zipf_stream(300, 40, 50), 0, ts=1_700_000_000.0))
    batches = parsed_batches(msgs, 7, 4)
    assert all(len({i.partition for i in b}) == 1 and len(b) <= 7 for b in batches)
    assert sorted(i.event.event_id for b in batches for i in b) == sorted(
        __import__("json").loads(v)["event_id"] for _, v in msgs)
