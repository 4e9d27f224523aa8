"""Bring your own data: `lsti data check` and the checks every loader of --events/--items data runs.

Tiny files written in tmp_path, one per malformed layout; unit level (no broker, no BERT).
"""

from __future__ import annotations

import gzip
import hashlib
import json

import numpy as np
import pytest

from encoders.data import EVENT_TYPES, describe_data, load_dataset, load_generic
from encoders.data_check import EVENT_TYPES as CHECK_TYPES
from encoders.data_check import MAX_SHOWN, MIN_EVENTS, TIE_RULE, ColumnMap, DataError, check_files
from encoders.split import MIN_EVENTS as SPLIT_MIN_EVENTS
from encoders.split import LeaveOneOut
from streams.cli import main as cli

GOOD_EVENTS = "user_id,item_id,event_type,ts\n" + "".join(
    f"u{u},i{(u + j) % 6},{'view' if j % 2 else 'click'},{1_600_000_000 + 10 * j}\n"
    for u in range(4) for j in range(5))
GOOD_ITEMS = "item_id,text\n" + "".join(f"i{i},A film number {i}\n" for i in range(6))


def write(tmp_path, name: str, text: str | bytes) -> str:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return str(p)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_constants_agree_with_the_split_and_the_stream_vocabulary():
    assert MIN_EVENTS == SPLIT_MIN_EVENTS and CHECK_TYPES == EVENT_TYPES


def test_good_files_pass_without_warnings(tmp_path):
    rep = check_files(write(tmp_path, "ev.csv", GOOD_EVENTS), write(tmp_path, "it.csv", GOOD_ITEMS))
    assert rep.ok and not rep.warnings, rep.summary()
    assert rep.rows["events"] == {"read": 20, "kept": 20, "refused": 0}
    assert rep.stats["overlap"] == 6 and rep.stats["ties"] == {"test": 0, "valid": 0}


def test_movielens_header_names_the_aliases_and_the_cli_prints_one_line(tmp_path, capsys):
    ev = write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n1,10,4,978300760\n1,11,5,978300761\n")
    rep = check_files(ev)
    assert not rep.ok and len(rep.errors) == 1
    err = rep.errors[0]
    for hint in ("'user_id'", "userId, movieId, rating, timestamp", "--user-col userId", "--item-col movieId",
                 "--time-col timestamp", "--event-type view"):
        assert hint in err
    rc, out, stderr = run_cli(capsys, "data", "check", "--events", ev)
    assert rc == 1 and "ERROR" in out
    assert stderr.strip().count("\n") == 0 and stderr.startswith("error: ") and "Traceback" not in stderr
    # the same input through eval: one line, exit 1, no traceback
    rc, out, stderr = run_cli(capsys, "eval", "--events", ev, "--model", "pop", "--json")
    assert rc == 1 and out == "" and stderr.startswith("error: ratings.csv: missing columns")
    assert "Traceback" not in stderr and "KeyError" not in stderr
    # mapped, it loads
    rc, out, _ = run_cli(capsys, "data", "check", "--events", ev, "--user-col", "userId", "--item-col", "movieId",
                         "--time-col", "timestamp", "--event-type", "view")
    assert rc == 0 and "result: usable" in out


def test_bom_and_spaces_around_headers_and_values_are_tolerated(tmp_path):
    clean = load_generic(write(tmp_path, "clean.csv", GOOD_EVENTS))
    bom = write(tmp_path, "bom.csv", b"\xef\xbb\xbf" + GOOD_EVENTS.encode())
    spaced = write(tmp_path, "spaced.csv", GOOD_EVENTS.replace(",", ", "))
    for path, note in ((bom, "byte order mark"), (spaced, "spaces around")):
        rep = check_files(path)
        assert rep.ok and any(note in n for n in rep.notes), rep.summary()
        d = load_generic(path)
        assert d.user_ids == clean.user_ids and d.item_ids == clean.item_ids
        np.testing.assert_array_equal(d.ts, clean.ts)
        np.testing.assert_array_equal(d.etypes, clean.etypes)


def test_raw_items_file_names_the_id_column_not_text(tmp_path, capsys):
    ev = write(tmp_path, "ev.csv", GOOD_EVENTS.replace("item_id", "movieId").replace(",i", ",").replace("\ni", "\n"))
    items = write(tmp_path, "movies.csv", "movieId,title,genres\n" + "".join(
        f"{i},Film {i} (1995),Animation|Comedy\n" for i in range(6)))
    rep = check_files(ev, items, ColumnMap.from_options(item="movieId"))
    assert not rep.ok
    assert any("movies.csv: missing text column 'text'" in e and "--text-cols title,genres" in e for e in rep.errors)
    rep = check_files(ev, items)
    assert "--item-col movieId" in rep.error_line() and "KeyError" not in rep.error_line()
    cols = ColumnMap.from_options(item="movieId", text="title,genres")
    assert check_files(ev, items, cols).ok
    d = load_generic(ev, items, cols)
    assert d.item_texts[1] == "Film 0 (1995). Genres: Animation, Comedy"
    rc, out, _ = run_cli(capsys, "data", "check", "--events", ev, "--items", items, "--item-col", "movieId",
                         "--text-cols", "title,genres", "--json")
    res = json.loads(out)
    assert rc == 0 and res["ok"] and res["columns"]["text"] == ["title", "genres"]


def test_unknown_event_type_is_refused_with_line_numbers_and_a_mapping_hint(tmp_path, capsys):
    ev = write(tmp_path, "r.csv", "user_id,item_id,event_type,ts\n" + "".join(
        f"u1,i{j},rating,{100 + j}\n" for j in range(8)))
    rep = check_files(ev)
    assert not rep.ok and rep.rows["events"]["refused"] == 8
    err = rep.error_line()
    assert "line 2: unknown event type 'rating'" in err and "--event-type view" in err and "--type-map rating=" in err
    assert len(rep.refused["events"]["first"]) == MAX_SHOWN and "and 3 more" in err
    with pytest.raises(DataError):
        load_generic(ev)
    rc, _, stderr = run_cli(capsys, "train", "--events", ev)
    assert rc == 1 and stderr.startswith("error: r.csv: no usable row") and "Traceback" not in stderr
    assert check_files(ev, cols=ColumnMap.from_options(event_type="view")).ok
    d = load_generic(ev, cols=ColumnMap.from_options(type_map="rating=buy"))
    assert set(d.etypes.tolist()) == {EVENT_TYPES.index("buy") + 1}
    # --type-map to a type outside the vocabulary is refused
    assert not check_files(ev, cols=ColumnMap.from_options(type_map="rating=purchase")).ok


def test_a_few_bad_rows_are_skipped_loudly_many_refuse_the_input(tmp_path):
    lines = GOOD_EVENTS.splitlines()
    bad = "\n".join(lines[:3] + ["u9,i1,rating,5", "u9,,view,6", "u9,i2,view,soon"] + lines[3:]) + "\n"
    path = write(tmp_path, "bad.csv", bad)
    rep = check_files(path)
    assert not rep.ok and "over 1% of the rows" in rep.error_line()  # 3 of 23
    rep = check_files(path, max_refused=0.2)
    assert rep.ok and rep.rows["events"] == {"read": 23, "kept": 20, "refused": 3}
    warn = next(w for w in rep.warnings if "rows refused" in w)
    for part in ("line 4: unknown event type 'rating'", "line 5: empty item id", "line 6: timestamp 'soon'"):
        assert part in warn
    assert len(load_generic(path, max_refused=0.2).items) == 20


def test_int_vs_zero_padded_ids_are_refused_with_the_reason(tmp_path):
    ev = write(tmp_path, "ev.csv", "user_id,item_id,event_type,ts\n" + "".join(
        f"u{u},{j + 1},view,{100 + j}\n" for u in range(3) for j in range(4)))
    items = write(tmp_path, "items.csv", "item_id,text\n" + "".join(f"{i:04d},film {i}\n" for i in range(1, 5)))
    rep = check_files(ev, items)
    assert not rep.ok
    assert "no item id of ev.csv is in items.csv" in rep.error_line()
    assert "ints vs zero-padded" in rep.error_line() and "'0001'" in rep.error_line()
    # a partial overlap is a loud warning
    items2 = write(tmp_path, "items2.csv", "item_id,text\n1,film 1\n" + "".join(
        f"{i:04d},film {i}\n" for i in range(2, 5)))
    rep = check_files(ev, items2)
    assert rep.ok and any(w.startswith("LOW OVERLAP") and "zero-padded" in w for w in rep.warnings)


def test_items_without_events_are_named_as_candidates(tmp_path):
    items = write(tmp_path, "it.csv", GOOD_ITEMS + "".join(f"x{i},unused {i}\n" for i in range(4)))
    ev = write(tmp_path, "ev.csv", GOOD_EVENTS + "u0,new1,view,1600000100\n")
    rep = check_files(ev, items)
    assert rep.ok
    assert any("4 of the 10 items in it.csv (40.0%) never appear" in w for w in rep.warnings)
    assert any("1 of the 7 items in ev.csv" in w and "placeholder" in w for w in rep.warnings)
    d = load_generic(ev, items)
    cand = describe_data(d)["candidates"]
    assert cand["n"] == d.n_items == 11 and cand["never_in_events"] == 4
    assert cand["rule"] == ("all items of the items file (10), of which 4 never appear in events, plus 1 items "
                            "named only by events (placeholder text)")


def test_duplicates_and_ties_at_the_split_boundary_and_the_tie_rule(tmp_path):
    rows = ["user_id,item_id,event_type,ts",
            "a,i1,view,10", "a,i2,view,20", "a,i3,view,30", "a,i4,view,30",  # test tie
            "b,i1,view,10", "b,i2,view,20", "b,i3,view,20", "b,i4,view,30",  # validation tie
            "c,i1,view,10", "c,i1,view,10", "c,i2,view,20", "c,i3,view,30"]  # a duplicate
    path = write(tmp_path, "ties.csv", "\n".join(rows) + "\n")
    rep = check_files(path)
    assert rep.ok and rep.stats["ties"] == {"test": 1, "valid": 1} and rep.stats["duplicates"] == 1
    assert any("ties at the split boundary: 1 of 3" in w for w in rep.warnings)
    assert any("1 rows repeat" in w and "lines 10 and 11" in w for w in rep.warnings)
    # the rule: equal timestamps keep file order, so user a's test target is i4 (the later line)
    d = load_generic(path)
    test = {d.user_ids[c.history.user]: d.item_ids[c.target] for c in LeaveOneOut(d).cases("test")}
    assert test["a"] == "i4"
    swapped = write(tmp_path, "swapped.csv", "\n".join(rows[:3] + [rows[4], rows[3]] + rows[5:]) + "\n")
    d2 = load_generic(swapped)
    assert {d2.user_ids[c.history.user]: d2.item_ids[c.target] for c in LeaveOneOut(d2).cases("test")}["a"] == "i3"
    assert describe_data(d)["tie_break"] == TIE_RULE and "file" in TIE_RULE


def test_millisecond_timestamps_are_detected_converted_and_order_within_a_second(tmp_path):
    # Retailrocket layout: timestamp(ms),visitorid,event,itemid,transactionid
    rows = ["timestamp,visitorid,event,itemid,transactionid",
            "1433221332900,7,view,1,", "1433221332100,7,addtocart,2,", "1433221333000,7,transaction,3,99",
            "1433221340000,8,view,1,", "1433221341000,8,view,2,", "1433221342000,8,view,3,"]
    path = write(tmp_path, "events.csv", "\n".join(rows) + "\n")
    cols = ColumnMap.from_options("visitorid", "itemid", "timestamp", "event", None, "addtocart=cart,transaction=buy")
    rep = check_files(path, cols=cols)
    assert rep.ok, rep.summary()
    assert rep.stats["timestamp_unit"] == "milliseconds"
    assert any("milliseconds" in n and "divided by 1,000" in n for n in rep.notes)
    d = load_generic(path, cols=cols)
    assert int(d.ts.max()) == 1433221342
    u7 = d.user_slice(d.user_ids.index("7"))
    # 100 ms before 900 ms in the same second, although the file has them the other way round
    assert [d.item_ids[i] for i in d.items[u7]] == ["2", "1", "3"]
    assert [EVENT_TYPES[t - 1] for t in d.etypes[u7]] == ["cart", "view", "buy"]


def test_movielens_dat_latin1_and_amazon_json_lines(tmp_path):
    ratings = tmp_path / "ratings.dat.gz"
    with gzip.open(ratings, "wt") as f:
        f.write("".join(f"1::{m}::4::{978300760 + m}\n" for m in (1, 2, 3)))
    movies = write(tmp_path, "movies.dat", "1::Misérables, Les (1995)::Drama\n2::Toy Story (1995)::Animation|Comedy\n"
                   "3::Heat (1995)::Action".encode("latin-1"))
    cols = ColumnMap.from_options("userId", "movieId", "timestamp", event_type="view", text="title,genres")
    rep = check_files(ratings, movies, cols)
    assert rep.ok and rep.files["items"]["encoding"] == "latin-1", rep.summary()
    assert any("MovieLens .dat" in n for n in rep.notes)
    d = load_generic(ratings, movies, cols)
    assert d.item_texts[1] == "Misérables, Les (1995). Genres: Drama"
    reviews = write(tmp_path, "reviews.json", "".join(json.dumps(
        {"reviewerID": "A1", "asin": f"B0{j}", "overall": 5.0, "unixReviewTime": 1390000000 + j}) + "\n"
        for j in range(3)))
    meta = write(tmp_path, "meta.json", "".join(
        repr({"asin": f"B0{j}", "title": f"Guitar {j}", "categories": [["Instruments", "Guitars"]]}) + "\n"
        for j in range(3)))  # Amazon 2014 metadata: Python literals, not JSON
    cols = ColumnMap.from_options("reviewerID", "asin", "unixReviewTime", event_type="buy", text="title,categories")
    rep = check_files(reviews, meta, cols)
    assert rep.ok and any("Python literals" in n for n in rep.notes), rep.summary()
    assert load_generic(reviews, meta, cols).item_texts[1] == "Guitar 0. Categories: Instruments, Guitars"


def test_headerless_and_missing_files_are_one_line_errors(tmp_path):
    rep = check_files(write(tmp_path, "ub.csv", "1,2268318,2520377,pv,1511544070\n1,2333346,2520771,pv,1511561733\n"))
    assert "looks like data, not a header" in rep.error_line()
    with pytest.raises(DataError, match="events file not found"):
        check_files(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="--type-map wants FROM=TO"):
        ColumnMap.from_options(type_map="addtocart")


def test_eval_json_names_its_data(tmp_path, capsys):
    ev = write(tmp_path, "mydata.csv", GOOD_EVENTS)
    items = write(tmp_path, "myitems.csv", GOOD_ITEMS + "x1,never seen\n")
    rc, out, _ = run_cli(capsys, "eval", "--events", ev, "--items", items, "--model", "pop", "--json",
                         "--threads", "1")
    assert rc == 0
    res = json.loads(out)
    sha = hashlib.sha256(open(ev, "rb").read()).hexdigest()
    assert res["dataset"] == f"events:mydata:{sha[:8]}"
    for key in ("model", "protocol", "seeds", "users", "n_items", "n_events", "ndcg@10", "runs"):
        assert key in res  # the contract keys stay
    data = res["data"]
    assert data["files"]["events"]["sha256"] == sha and data["files"]["items"]["name"] == "myitems.csv"
    assert data["rows"]["events"] == {"read": 20, "kept": 20, "refused": 0}
    assert data["candidates"]["rule"].startswith("all items of the items file (7), of which 1 never appear")
    assert data["tie_break"] == TIE_RULE
    # a shared dataset keeps its name; the object is there for it too
    assert describe_data(load_generic(ev)).get("label", "").startswith("events:mydata:")


def test_dataset_with_events_is_an_error_and_columns_need_events(tmp_path, capsys):
    ev = write(tmp_path, "ev.csv", GOOD_EVENTS)
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--dataset", "ml-1m", "--events", ev])
    assert e.value.code == 2 and "--dataset and --events exclude each other" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["eval", "--user-col", "userId"])
    with pytest.raises(SystemExit):  # one type for all rows, or a column: not both
        cli.main(["data", "check", "--events", ev, "--type-col", "e", "--event-type", "view"])


def test_dim_help_threads_and_progress_off_without_a_terminal(tmp_path, monkeypatch):
    import torch

    p = cli.build_parser()
    sub = next(a for a in p._actions if a.dest == "command").choices
    dim = next(a for a in sub["eval"]._actions if a.dest == "dim")
    assert "128" in dim.help and "64 for gru4rec" in dim.help and "50 for sasrec" in dim.help
    assert any(a.dest == "threads" for a in sub["eval"]._actions)
    seen = {}
    monkeypatch.setattr(cli, "cmd_eval", lambda args: seen.setdefault("args", args) and 0)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    cli.main(["eval", "--events", write(tmp_path, "ev.csv", GOOD_EVENTS)])
    assert seen["args"].quiet is True
    before = torch.get_num_threads()
    try:
        cli._threads(type("A", (), {"threads": 1})())
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_load_dataset_passes_the_mapping(tmp_path):
    ev = write(tmp_path, "ev.csv", GOOD_EVENTS.replace("user_id", "visitor"))
    d = load_dataset(None, events=ev, cols=ColumnMap.from_options(user="visitor"))
    assert d.n_users == 4 and d.label.startswith("events:ev:")
