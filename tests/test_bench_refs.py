"""`lsti bench stream`: system names, ratios to the aiokafka loop, the reference processors' command line
(no broker: the figures themselves come from a run, BENCHMARKS.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.bench import refs
from streams.bench.stream import SYSTEMS, add_ratios, resolve_systems


def test_every_system_by_default_and_by_all():
    assert SYSTEMS == ("model", "aiokafka", "aiokafka-batched", "faust", "faust-batch-table", "lsti")
    assert resolve_systems(SYSTEMS) == SYSTEMS
    assert resolve_systems(("all",)) == SYSTEMS
    assert resolve_systems("all") == SYSTEMS
    assert resolve_systems("faust-batch-table,aiokafka,aiokafka") == ("faust-batch-table", "aiokafka")


def test_every_process_system_can_be_profiled_and_only_when_it_runs():
    from streams.bench.stream import PROFILABLE, run_bench
    from streams.cli.main import build_parser

    assert PROFILABLE == SYSTEMS[1:]
    for name in PROFILABLE:
        assert build_parser().parse_args(["bench", "stream", "--profile-system", name]).profile_system == name
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "stream", "--profile-system", "model"])  # no process of its own
    with pytest.raises(SystemExit, match="--profile-system faust is not among the systems run"):
        run_bench(systems=("aiokafka",), profile=Path("x.json"), profile_system="faust")


def test_unknown_system_refused_in_one_line():
    with pytest.raises(SystemExit, match="unknown system.*nope"):
        resolve_systems(("aiokafka", "nope"))


def test_ratios_to_the_aiokafka_loop_and_old_keys_kept():
    result = {"systems": {"model": {"events_per_s": 20000.0}, "aiokafka": {"events_per_s": 40000.0},
                          "aiokafka-batched": {"events_per_s": 80000.0}, "faust": {"events_per_s": 4000.0},
                          "faust-batch-table": {"events_per_s": 10000.0}, "lsti": {"events_per_s": 3000.0}}}
    add_ratios(result)
    assert result["vs_aiokafka"] == {"model": 0.5, "aiokafka": 1.0, "aiokafka-batched": 2.0, "faust": 0.1,
                                     "faust-batch-table": 0.25, "lsti": 0.075}
    assert result["systems"]["faust-batch-table"]["vs_aiokafka"] == 0.25
    assert result["lsti_vs_aiokafka"] == 0.075
    assert result["lsti_vs_faust_trivial"] == 0.75


def test_no_ratio_without_the_loop():
    result = {"systems": {"lsti": {"events_per_s": 3000.0}}}
    add_ratios(result)
    assert "vs_aiokafka" not in result and "vs_aiokafka" not in result["systems"]["lsti"]


def test_reference_kinds_on_the_command_line(monkeypatch):
    ran = []
    monkeypatch.setattr(refs, "faust_batch_table", lambda *a: ran.append(a))
    refs.main(["faust-batch-table", "--bootstrap", "b:1", "--src", "s", "--dst", "d", "--group", "g",
               "--state-bytes", "100", "--batch-max", "50"])
    assert ran and ran[0][-2:] == (100, 50)
    with pytest.raises(SystemExit):
        refs.main(["nope", "--bootstrap", "b:1", "--src", "s", "--dst", "d", "--group", "g"])
