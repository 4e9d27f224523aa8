"""`lsti`: one command, one subcommand per job. Every Kafka command takes --bootstrap / LSTI_BOOTSTRAP."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from streams.batch.train_options import RECIPES, train_configs
from streams.config import state_home
from streams.kafka.bootstrap import resolve_bootstrap

DEFAULT_DATA = "default: $LSTI_DATA or ../shared/data beside the checkout"


def _add_bootstrap(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", help="Kafka bootstrap HOST:PORT (env LSTI_BOOTSTRAP; default: the broker "
                   "started by `lsti broker`)")


class _Given(argparse.Action):
    """Stores the value and remembers that the option was given (so --dataset with --events can be refused)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def _add_data(p: argparse.ArgumentParser, default_dataset: str | None = "ml-1m") -> None:
    p.add_argument("--dataset", default=default_dataset, choices=["ml-1m", "taobao", "amazon-mi"], action=_Given,
                   help=f"shared dataset to use (default {default_dataset}; not with --events)")
    p.add_argument("--data-dir", type=Path, help=f"folder holding the datasets ({DEFAULT_DATA})")
    p.add_argument("--events", type=Path, help="your own events file (CSV/TSV/JSONL/MovieLens .dat, plain or .gz; "
                   "columns user_id,item_id,event_type,ts unless mapped: see --user-col...; README `Your own data`)")
    p.add_argument("--items", type=Path, help="your own items file (same formats; columns item_id,text unless mapped)")


COLUMN_OPTIONS = ("user_col", "item_col", "time_col", "type_col", "event_type", "type_map", "text_cols",
                  "max_refused")


def _add_columns(p: argparse.ArgumentParser) -> None:
    """Column mapping of --events/--items data (encoders.data_check.ColumnMap)."""
    g = p.add_argument_group("columns of --events/--items data")
    g.add_argument("--user-col", help="events: the user id column (default user_id)")
    g.add_argument("--item-col", help="the item id column of the events and of the items file (default item_id; "
                   "the items file may also call it item_id)")
    g.add_argument("--time-col", help="events: the timestamp column (default ts): epoch seconds, or milliseconds "
                   "and finer (detected: values > 1e11, converted), or ISO dates")
    types = g.add_mutually_exclusive_group()
    types.add_argument("--type-col", help="events: the event type column (default event_type)")
    types.add_argument("--event-type", help="give every event this type, for data without one (ratings, "
                       "reviews): view, click, cart, fav or buy")
    g.add_argument("--type-map", metavar="FROM=TO,...", help="rename raw event types, e.g. "
                   "addtocart=cart,transaction=buy")
    g.add_argument("--text-cols", metavar="COL,COL", help="items: the text column(s) (default text); several are "
                   "joined: 'title. Genres: a, b'")
    g.add_argument("--max-refused", type=float, metavar="FRAC", help="refuse the input when more than this share "
                   "of rows cannot be read (default 0.01)")


def _columns(args: argparse.Namespace):
    """The ColumnMap of the column options (None when none was given)."""
    from encoders.data_check import ColumnMap

    if all(getattr(args, k, None) is None for k in COLUMN_OPTIONS[:-1]):
        return None
    return ColumnMap.from_options(args.user_col, args.item_col, args.time_col, args.type_col, args.event_type,
                                  args.type_map, args.text_cols)


def _load(args: argparse.Namespace):
    from encoders.data import load_dataset

    return load_dataset(args.dataset, args.data_dir, args.events, args.items, cols=_columns(args),
                        max_refused=getattr(args, "max_refused", None))


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, help="maximum epochs (default 20; early stopping on validation)")
    p.add_argument("--max-minutes", type=float, help="stop training after this many minutes (default 14)")
    p.add_argument("--patience", type=int, help="stop after this many epochs without a better validation NDCG@10 "
                   "(default 10)")
    p.add_argument("--schedule", choices=("cosine", "constant"), help="learning rate after the warmup (default "
                   "cosine, annealed to 0 over --epochs)")
    p.add_argument("--converge", action="store_true", help="train to convergence by one rule for every model: "
                   "constant rate until 20 epochs without a better validation NDCG@10, then from the best weights "
                   "10 epochs annealed to 0 (--decay-epochs), 4-hour cap; the result's train_info says the epochs "
                   "run and the stop reason (other flags still apply)")
    p.add_argument("--decay-epochs", type=int, help="after the plateau, this many epochs from the best weights with "
                   "the rate annealed to 0 (default 0; 10 with --converge)")
    p.add_argument("--dim", type=int, help="embedding size (default 128 for fused, short and long; 64 for gru4rec; "
                   "50 for sasrec, its reference's)")
    p.add_argument("--batch-size", type=int, help="default 64")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 0.02 LSTI, 0.001 SASRec and GRU4Rec)")
    p.add_argument("--device", help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--dropout", type=float, help="dropout (default 0.2)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    p.add_argument("--aux-weight", type=float, help="fused: weight of the short-only and long-only auxiliary losses")
    p.add_argument("--id-dropout", type=float, help="share of items trained without their id embedding per batch "
                   "(teaches scoring from text alone, for items new to the catalogue; default 0)")
    p.add_argument("--long-ids", action="store_true", default=None, help="fused and long: the long-term side "
                   "pools a learned id vector of each item besides its text (FISM-style; default off)")
    p.add_argument("--gate", choices=("user", "dim"), help="fused: one gate value per user and event (default) or "
                   "one per dimension")
    p.add_argument("--gate-bias", type=float, help="fused: initial gate bias (default 3: the gate starts at 0.95, "
                   "near the short-term side)")
    p.add_argument("--warmup", type=float, metavar="FRAC", help="share of all steps with a linear warmup (default "
                   "0.05; 0.002 with --converge; 0 = none)")
    p.add_argument("--windows", choices=("random", "last"), help="training window of users with more than "
                   "max_len+1 events: a random one each epoch (default) or always the last (SASRec's reference)")
    p.add_argument("--batches", choices=("bucketed", "shuffled"), help="training batches of similar lengths "
                   "(default; less padding) or a plain shuffled permutation (SASRec's reference)")
    p.add_argument("--clip", type=float, metavar="NORM", help="clip the gradient norm at NORM (default 5; 0 = no "
                   "clipping)")


def cmd_broker(args: argparse.Namespace) -> int:
    from streams.kafka.broker import main_broker

    return main_broker(args.data_dir or state_home() / "kafka", port=args.port, heap_mb=args.heap_mb)


def cmd_run(args: argparse.Namespace) -> int:
    from streams.artifacts import default_artifacts_dir
    from streams.batch.build import find_artifact
    from streams.config import Topics, WorkerSettings
    from streams.worker.process import run_worker

    artifact = args.artifact or find_artifact(default_artifacts_dir())
    if artifact is None:
        sys.exit("error: no model artifact: train one with `lsti train` or pass --artifact DIR")
    s = WorkerSettings.from_env(bootstrap=resolve_bootstrap(args), artifact=Path(artifact), data_dir=args.data_dir,
                                app_id=args.app_id, topics=Topics.with_prefix(args.topic_prefix),
                                partitions=args.partitions, k=args.k, batch_max=args.batch_max,
                                batch_within=args.batch_within, web_port=args.web_port, loglevel=args.loglevel)
    return run_worker(s)


def _checked_bootstrap(args: argparse.Namespace) -> str:
    """The bootstrap, once one connection with the LSTI_KAFKA_* settings worked; else exit with one line
    (refused authentication, untrusted certificate, plaintext client on a TLS/SASL listener, no broker)."""
    from streams.kafka.tools import KafkaAccessError, check_access

    bootstrap = resolve_bootstrap(args)
    try:
        check_access(bootstrap)
    except KafkaAccessError as e:
        sys.exit(f"error: {e}")
    return bootstrap


def _add_topic_prefix(p: argparse.ArgumentParser) -> None:
    p.add_argument("--topic-prefix", default="", metavar="PREFIX", help="prefix of the topic name, as given to "
                   "`lsti run --topic-prefix` (the topic used is PREFIX + --topic)")


def cmd_publish(args: argparse.Namespace) -> int:
    from kafka.errors import KafkaError

    from streams.kafka.tools import publish, read_event_log

    bootstrap, topic = _checked_bootstrap(args), args.topic_prefix + args.topic
    try:
        n = publish(bootstrap, read_event_log(args.file), topic=topic, rate=args.rate, progress=not args.quiet)
    except KafkaError as e:
        sys.exit(f"error: publishing to {topic} at {bootstrap} failed: {type(e).__name__}: {e}")
    print(f"published {n} events to {topic}", file=sys.stderr)
    return 0


def cmd_consume(args: argparse.Namespace) -> int:
    from kafka.errors import KafkaError

    from streams.kafka.tools import consume

    bootstrap, topic = _checked_bootstrap(args), args.topic_prefix + args.topic
    try:
        for _key, value in consume(bootstrap, topic, from_beginning=args.from_beginning,
                                  max_messages=args.max, timeout_s=args.timeout, group=args.group):
            sys.stdout.write(value.decode(errors="replace") + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    except KafkaError as e:
        sys.exit(f"error: consuming {topic} at {bootstrap} failed: {type(e).__name__}: {e}")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    from streams.kafka.tools import request_forget

    users = list(args.users)
    if args.file:
        users += [line.strip() for line in Path(args.file).read_text().splitlines() if line.strip()]
    if not users:
        sys.exit("error: give user ids (arguments or --file)")
    n = _send_or_exit(args, "forget", lambda bootstrap, topic: request_forget(bootstrap, users, topic))
    print(f"asked the workers to forget {n} users (topic {args.topic_prefix}forget); /health 'forgotten' counts "
          "them as done", file=sys.stderr)
    return 0


def _send_or_exit(args: argparse.Namespace, topic: str, send) -> int:
    """`send(bootstrap, PREFIX + topic)` on the checked bootstrap; a Kafka error ends the command with one line."""
    from kafka.errors import KafkaError

    bootstrap, full = _checked_bootstrap(args), args.topic_prefix + topic
    try:
        return send(bootstrap, full)
    except KafkaError as e:
        sys.exit(f"error: publishing to {full} at {bootstrap} failed: {type(e).__name__}: {e}")


def cmd_items(args: argparse.Namespace) -> int:
    from streams.contracts.items import BadItemMessage, ItemChange, parse_item_change
    from streams.kafka.tools import publish_item_changes

    if args.action == "add":
        if args.text is None and not args.file:
            sys.exit("error: `lsti items add` needs --text TEXT (one item) or --file items.jsonl")
        changes = [ItemChange(i, text=args.text) for i in args.item_ids] if args.text is not None else []
    else:
        changes = [ItemChange(i, deleted=args.action == "delete",
                              available=None if args.action == "delete" else args.action == "available")
                   for i in args.item_ids]
    if args.file:
        for n, line in enumerate(Path(args.file).read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    changes.append(parse_item_change(line))
                except BadItemMessage as e:
                    sys.exit(f"error: {args.file}:{n}: {e}")
    if not changes:
        sys.exit("error: give item ids (or --file)")
    n = _send_or_exit(args, "items", lambda bootstrap, topic: publish_item_changes(bootstrap, changes, topic))
    print(f"published {n} catalogue changes to {args.topic_prefix}items", file=sys.stderr)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from streams.kafka.tools import publish, read_event_log, sort_by_time

    if args.rebuild:
        from streams.artifacts import default_artifacts_dir
        from streams.batch.build import find_artifact
        from streams.batch.rebuild import rebuild_changelog

        artifact = args.artifact or find_artifact(default_artifacts_dir())
        if artifact is None:
            sys.exit("error: --rebuild needs a model artifact (--artifact DIR or artifacts/CURRENT)")
        out = rebuild_changelog(resolve_bootstrap(args), Path(artifact), list(read_event_log(args.file)), args.app_id,
                                args.partitions, progress=not args.quiet)
        print(json.dumps(out))
        return 0
    records = sort_by_time(read_event_log(args.file))
    n = publish(resolve_bootstrap(args), records, topic=args.topic, rate=args.rate, total=len(records),
                progress=not args.quiet, desc="replay")
    print(f"replayed {n} events in event-time order to {args.topic}", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from streams.batch.build import build

    tcfg, mcfg = train_configs(args)
    _threads(args)
    path = build(args.dataset, args.data_dir, args.events, args.items, mode=args.model, train_cfg=tcfg,
                 model_cfg=mcfg, root=args.out, data=_load(args), progress=not args.quiet)
    print(json.dumps(json.loads((path / "manifest.json").read_text())["test_metrics"]))
    print(f"artifact: {path}", file=sys.stderr)
    return 0


def _threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def cmd_eval(args: argparse.Namespace) -> int:
    from encoders.data import describe_data
    from encoders.evaluate import PROTOCOL, run_model, seed_runs_report, text_vectors_for
    from encoders.split import LeaveOneOut, hold_out_items

    _threads(args)
    data = _load(args)
    hidden = hold_out_items(data, args.cold_items) if args.cold_items else None
    split = LeaveOneOut(data, hidden)
    runs = []
    model = None
    if args.artifact:
        from streams.artifacts import load_artifact

        art = load_artifact(Path(args.artifact))
        if art.model.cfg.n_items != data.n_items or art.model.cfg.mode != args.model:
            sys.exit("error: --artifact was built from other data or another model mode")
        model = art.model
    uses_text = args.model in ("fused", "short", "long") and model is None
    tv = text_vectors_for(data, progress=not args.quiet) if uses_text else None
    first = args.first_seed
    seeds = [0] if model is not None or args.model in ("pop", "itemknn") else list(range(first, first + args.seeds))
    for seed in seeds:
        tcfg, mcfg = train_configs(args, seed)
        runs.append(run_model(args.model, split, seed, tcfg, mcfg, progress=not args.quiet, text_vectors=tv,
                              model=model))
    out = {
        "dataset": data.label, "model": args.model, "protocol": PROTOCOL, "seeds": seeds,
        "users": runs[0]["test"]["users"], "n_items": data.n_items, "n_events": int(len(data.items)),
        **seed_runs_report(runs), "data": describe_data(data),
    }
    if hidden is not None:
        out["cold_items"] = {"fraction": args.cold_items, "hidden_items": int(len(hidden)),
                             "note": "every event of the hidden items removed from training and from the "
                                     "training softmax; `cold` = test targets that are hidden items"}
    text = json.dumps(out, indent=None if args.json else 2)
    if args.json:
        print(text)
    else:
        print(f"{data.label} {args.model}: NDCG@10 {out['ndcg@10']:.4f} HR@10 {out['hr@10']:.4f} "
              f"NDCG@20 {out['ndcg@20']:.4f} HR@20 {out['hr@20']:.4f} over {out['users']} users")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from encoders.data_check import DEFAULT_MAX_REFUSED, check_files

    cols = _columns(args)
    rep = check_files(args.events, args.items, cols, max_refused=args.max_refused or DEFAULT_MAX_REFUSED)
    print(json.dumps(rep.to_dict(), indent=None if args.json else 2) if args.json else rep.summary())
    if not rep.ok:
        print(f"error: {rep.errors[0]}" + (f" (and {len(rep.errors) - 1} more)" if len(rep.errors) > 1 else ""),
              file=sys.stderr)
        return 1
    return 1 if args.strict and rep.warnings else 0


def cmd_eval_pool(args: argparse.Namespace) -> int:
    from encoders.evaluate import pool_reports

    try:
        out = pool_reports([json.loads(Path(f).read_text()) for f in args.reports])
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(json.dumps(out))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from streams.jobs.demo import run_demo

    return run_demo(args)


def add_nightly_args(p: argparse.ArgumentParser) -> None:
    """The options of `lsti nightly` (here, not in streams.batch.nightly, so `lsti --help` does not import torch)."""
    _add_bootstrap(p)
    _add_data(p)
    p.add_argument("--base", default="CURRENT", help="base artifact: folder or version name (default CURRENT)")
    p.add_argument("--cutoff", type=int, help="epoch seconds: events after it are ignored (default: all; with "
                   "--archive: the last UTC midnight, so that every shard of a night reads the same days)")
    p.add_argument("--out", type=Path, help="artifacts folder (default ./artifacts, env LSTI_ARTIFACTS)")
    p.add_argument("--topic-prefix", default="", help="prefix of every topic name (namespacing on a shared Kafka)")
    p.add_argument("--no-publish", action="store_true", help="write the artifact only: no Kafka, not made CURRENT "
                   "(the items topic is still read when --bootstrap or LSTI_BOOTSTRAP is given)")
    p.add_argument("--activate", action="store_true", help="make it CURRENT even with --no-publish")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("archive and sharding (README `Archive and sharded nightly`)")
    g.add_argument("--archive", type=Path, metavar="DIR", help="read the events from this `lsti archive` folder "
                   "(instead of --dataset/--events)")
    g.add_argument("--no-items-topic", action="store_true", help="do not read the items and forget topics (by "
                   "default both are read whole when there is a Kafka: added items get their text, deleted/unavailable "
                   "ones are recorded in the manifest; forgotten users' events up to their request are left out)")
    g.add_argument("--shard", metavar="I/N", help="compute the long-term vectors of shard I of N only (users with "
                   "stable_hash(user) %% N == I) into --shards-dir/shard-I-of-N; no artifact, nothing published")
    g.add_argument("--shards-dir", type=Path, metavar="DIR", help="where --shard writes (default "
                   "OUT/.nightly-shards)")
    g.add_argument("--merge-shards", nargs="*", type=Path, metavar="DIR", help="last step: take the long-term "
                   "vectors from these shard folders (or folders of them; none given: OUT/.nightly-shards), "
                   "compute the rest, write, publish and make CURRENT as an unsharded run does; a shard missing or "
                   "computed from other inputs is computed here")
    g.add_argument("--wait-shards", type=float, default=0.0, metavar="SECONDS", help="with --merge-shards: wait "
                   "up to this long for missing shards (default 0)")


def cmd_nightly(args: argparse.Namespace) -> int:
    from streams.batch.nightly import main_nightly

    return main_nightly(args)


def cmd_archive(args: argparse.Namespace) -> int:
    from streams.jobs.archive import main_archive

    return main_archive(args, _checked_bootstrap(args))


def cmd_parity(args: argparse.Namespace) -> int:
    from streams.jobs.parity import main_parity

    return main_parity(args)


def cmd_bench_recovery(args: argparse.Namespace) -> int:
    from streams.bench.recovery import run_recovery_bench

    print(json.dumps(run_recovery_bench(args.users, args.bootstrap)))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from streams.bench.stream import run_bench

    out = run_bench(n=args.n, n_users=args.users, n_items=args.items, dim=args.dim, bootstrap=args.bootstrap,
                    latency_seconds=args.latency_seconds, latency_rate=args.latency_rate,
                    systems=tuple(args.systems.split(",")), batch_max=args.batch_max,
                    batch_within=args.batch_within, profile=args.profile, workers=args.workers,
                    explain=args.explain, profile_system=args.profile_system)
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lsti", description="LSTI: real-time recommendations from long-term (BERT) "
                                "and short-term (LSTM) interests over Kafka.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("broker", help="run the embedded Apache Kafka (KRaft, one node) in the foreground")
    b.add_argument("--data-dir", type=Path, help="broker data folder (default .lsti/kafka)")
    b.add_argument("--port", type=int, help="PLAINTEXT port (default: a free loopback port)")
    b.add_argument("--heap-mb", type=int, default=384, help="JVM heap (default 384)")
    b.set_defaults(func=cmd_broker)

    r = sub.add_parser("run", help="run a stream worker (Faust) on the events topic")
    _add_bootstrap(r)
    r.add_argument("--artifact", type=Path, help="model artifact folder (default: artifacts/CURRENT)")
    r.add_argument("--data-dir", type=Path, help="worker state folder for RocksDB (default .lsti/worker)")
    r.add_argument("--partitions", type=int, default=4, help="partitions of the events topic (default 4)")
    r.add_argument("-k", type=int, default=10, help="items per recommendation (default 10)")
    r.add_argument("--batch-max", type=int, help="micro-batch size (default 500)")
    r.add_argument("--batch-within", type=float, help="ignored since the batch path (the agent gets each fetched "
                   "batch at once); kept so that old command lines still run")
    r.add_argument("--web-port", type=int, default=0, help="port of /health and /metrics (default: free port)")
    r.add_argument("--app-id", default="lsti", help="Faust app id = consumer group and table prefix")
    r.add_argument("--topic-prefix", default="", help="prefix of every topic name (namespacing on a shared Kafka)")
    r.add_argument("--loglevel", default="info")
    r.set_defaults(func=cmd_run)

    d = sub.add_parser(
        "demo", help="the whole path once: broker, model, index, worker, replay, recommendations",
        description="The whole path once: embedded Kafka, the model (trained on first use, then loaded), the item "
        "index, a Faust worker, a replay of real users' histories, recommendations and a summary (with the model's "
        "offline test NDCG@10/HR@10).",
        epilog="Training on first use (or with --retrain): --recipe quick (the default below --max-minutes 10) is "
        "dim 64, batch 16, 50-event windows, lr 0.02, up to 5 epochs, 1 torch thread, best epoch on 1,000 "
        "validation users: test NDCG@10 ~0.15 on ml-1m in about a minute of one core. --recipe full (the default "
        "from --max-minutes 10, e.g. --retrain --max-minutes 15) is what `lsti train` does: dim 128, batch 64, "
        "200-event windows, up to 20 epochs (~0.18), torch threads by the load. Training flags given (--epochs, "
        "--dim, --lr, ...) override the recipe's values. The time cap is wall clock: the learning rate anneals "
        "to 0 by then, however busy the machine.")
    _add_bootstrap(d)
    _add_data(d)
    _add_train(d)
    d.set_defaults(max_minutes=4.0)
    for action in d._actions:  # the demo's own defaults (the recipe) in the help of the shared training flags
        if action.dest == "max_minutes":
            action.help = "cap on training time, wall clock (default 4; 10 or more picks --recipe full)"
        elif action.dest in ("epochs", "dim", "batch_size", "lr"):
            what = "batch size" if action.dest == "batch_size" else action.help.split(" (default")[0]
            action.help = f"{what} (default: the recipe's)"
    d.add_argument("--recipe", choices=("quick", "full"), help="training recipe when the demo trains (default: "
                   "quick below --max-minutes 10, full from 10; see below)")
    d.add_argument("--threads", type=int, help="torch CPU threads for training (default: 1 with quick, the cores "
                   "not busy by the load average with full)")
    d.add_argument("--users", type=int, default=200, help="replay the full histories of this many users")
    d.add_argument("--rate", type=float, help="events/s (default: as fast as possible)")
    d.add_argument("--show", type=int, default=5, help="recommendations to print as they arrive")
    d.add_argument("--retrain", action="store_true", help="train a new model even if one exists")
    d.add_argument("--stall-seconds", type=float, default=90.0, help="give up only after this long without "
                   "progress: no new recommendation (or a worker that neither logs nor computes while starting); "
                   "there is no overall deadline (default 90)")
    d.set_defaults(func=cmd_demo)

    pub = sub.add_parser("publish", help="publish events (JSONL/CSV file, or - for JSONL on stdin)")
    _add_bootstrap(pub)
    pub.add_argument("file", help="events file or -")
    pub.add_argument("--topic", default="events", help="topic (default events)")
    _add_topic_prefix(pub)
    pub.add_argument("--rate", type=float, help="events/s (default: as fast as possible)")
    pub.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    pub.set_defaults(func=cmd_publish)

    it = sub.add_parser("items", help="change the catalogue live: add, delete, mark (un)available items",
                        description="Publishes catalogue changes on the items topic (README `Removing items`); every "
                                    "worker applies them within seconds, and the nightly step reads them too.")
    _add_bootstrap(it)
    it.add_argument("action", choices=("add", "delete", "unavailable", "available"))
    it.add_argument("item_ids", nargs="*", metavar="ITEM_ID")
    it.add_argument("--text", help="add: the item's text (title, description) for BERT")
    it.add_argument("--file", help="also publish the changes in this JSONL file ({\"item_id\", \"text\"} or "
                    "{\"item_id\", \"deleted\": true} or {\"item_id\", \"available\": false} per line)")
    _add_topic_prefix(it)
    it.set_defaults(func=cmd_items)

    fg = sub.add_parser("forget", help="delete users' short-term states and long-term vectors (privacy)",
                        description="Publishes one request per user on the forget topic; the worker owning the "
                                    "user writes tombstones on both tables, so the compacted changelogs drop the "
                                    "user's states too. A later event of the user starts a fresh state.")
    _add_bootstrap(fg)
    fg.add_argument("users", nargs="*", metavar="USER_ID", help="user ids to forget")
    fg.add_argument("--file", help="also forget the user ids in this file, one per line")
    _add_topic_prefix(fg)
    fg.set_defaults(func=cmd_forget)

    con = sub.add_parser("consume", help="print recommendations (JSON lines) as they arrive")
    _add_bootstrap(con)
    con.add_argument("--topic", default="recommendations", help="topic (recommendations, events-dlq, ...)")
    _add_topic_prefix(con)
    con.add_argument("--from-beginning", action="store_true")
    con.add_argument("--max", type=int, help="stop after this many messages")
    con.add_argument("--timeout", type=float, help="stop after this many seconds without a message")
    con.add_argument("--group", help="consumer group (default: none, nothing committed)")
    con.set_defaults(func=cmd_consume)

    rep = sub.add_parser("replay", help="replay an event log (JSONL/CSV, plain or .gz) in event-time order")
    _add_bootstrap(rep)
    rep.add_argument("file")
    rep.add_argument("--topic", default="events")
    rep.add_argument("--rate", type=float, help="events/s (default: as fast as possible)")
    rep.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    rep.add_argument("--rebuild", action="store_true", help="new deployment: compute every user's state offline "
                     "and write it to the table changelog (workers then start from it), instead of streaming")
    rep.add_argument("--artifact", type=Path, help="with --rebuild: model artifact (default: artifacts/CURRENT)")
    rep.add_argument("--app-id", default="lsti", help="with --rebuild: the workers' app id")
    rep.add_argument("--partitions", type=int, default=4, help="with --rebuild: partitions of the events topic")
    rep.set_defaults(func=cmd_replay)

    t = sub.add_parser("train", help="train a model and write a versioned artifact (weights, index, vectors)")
    _add_data(t)
    _add_train(t)
    _add_columns(t)
    t.add_argument("--model", default="fused", choices=["fused", "short", "long"])
    t.add_argument("--out", type=Path, help="artifacts folder (default ./artifacts, env LSTI_ARTIFACTS)")
    t.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bars (also off when stderr is no "
                   "terminal)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="leave-one-out, full-ranking evaluation of one model on one dataset")
    _add_data(e)
    _add_columns(e)
    _add_train(e)
    e.add_argument("--model", default="fused", choices=["pop", "itemknn", "short", "long", "fused", "sasrec",
                                                       "gru4rec"])
    e.add_argument("--recipe", choices=RECIPES, help="sasrec: 'reference' (the default) is "
                   "pmixer/SASRec.pytorch's recipe (post-LN blocks, every sequence padded to 200, hidden 50, batches "
                   "of 128 shuffled users, each user's last 201 events, no gradient clipping, no warmup); 'lsti' is "
                   "the shared loop's own (pre-LN query norm, batch-length padding, random windows, length-bucketed "
                   "batches, clipping, warmup; the sasrec rows of sessions 1-5); other flags given still override it")
    e.add_argument("--norm", choices=("original", "post"), help="sasrec blocks: 'original' (default; only the "
                   "attention query layer-normed) or 'post' (post-LN, the reference's norm_first=False)")
    e.add_argument("--pad", choices=("batch", "fixed"), help="sasrec padding: to the longest sequence of the batch "
                   "(default) or always to the full width (the reference; scores independent of batch-mates)")
    e.add_argument("--seeds", type=int, default=1, help="seeds to average (default 1)")
    e.add_argument("--first-seed", type=int, default=0, help="seeds run are FIRST..FIRST+SEEDS-1 (default 0)")
    e.add_argument("--artifact", type=Path, help="evaluate this trained artifact instead of training")
    e.add_argument("--cold-items", type=float, default=0.0, metavar="FRAC",
                   help="cold-start experiment: hide this fraction of items from training (e.g. 0.1) and "
                        "report test targets among them (`cold`) apart")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--threads", type=int, help="torch CPU threads (torch.set_num_threads; default: torch's choice)")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bars (also off when stderr is no "
                   "terminal)")
    e.set_defaults(func=cmd_eval)
    ep = sub.add_parser("eval-pool", help="pool `lsti eval --json` outputs of the same model run with other seeds "
                        "(mean and spread over all their runs)")
    ep.add_argument("reports", nargs="+", type=Path, help="JSON files written by `lsti eval --json`")
    ep.set_defaults(func=cmd_eval_pool)
    dat = sub.add_parser("data", help="your own data: `lsti data check --events F --items F`")
    dsub = dat.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    dc = dsub.add_parser("check", help="check --events/--items files before training: columns, refused rows, "
                         "id overlap, duplicates, timestamp ties; exits 1 when the input would be refused")
    dc.add_argument("--events", type=Path, required=True, help="events file (CSV/TSV/JSONL/MovieLens .dat, "
                    "plain or .gz)")
    dc.add_argument("--items", type=Path, help="items file (same formats)")
    _add_columns(dc)
    dc.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    dc.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    dc.set_defaults(func=cmd_data_check)
    n = sub.add_parser("nightly", help="refresh without retraining: new items, long-term vectors, index; "
                       "publish, then make CURRENT")
    add_nightly_args(n)
    n.set_defaults(func=cmd_nightly)

    arc = sub.add_parser("archive", help="write the events topic to date-partitioned Parquet files (what "
                         "`lsti nightly --archive DIR` reads)",
                         description="A Kafka-to-files sink in its own consumer group: every valid event of the "
                         "events topic goes to DIR/date=YYYY-MM-DD/part-<partition>-<first offset>.parquet (columns "
                         "user_id, item_id, event_type, ts, event_id, partition, offset); offsets are committed only "
                         "after a file is fsynced and renamed into place. Records the worker would dead-letter "
                         "are skipped and counted. Runs until stopped (SIGTERM/SIGINT write what is buffered "
                         "first) or, with --until-idle, until no record came for that long.")
    _add_bootstrap(arc)
    arc.add_argument("--out", type=Path, required=True, metavar="DIR", help="archive folder (created if missing)")
    arc.add_argument("--topic-prefix", default="", metavar="PREFIX", help="prefix of the topic names, as given to "
                     "`lsti run --topic-prefix` (reads PREFIX + events)")
    arc.add_argument("--group", default="lsti-archive", help="consumer group (default lsti-archive; several archive "
                     "processes in one group split the partitions)")
    arc.add_argument("--until-idle", type=float, metavar="SECONDS", help="stop after this long without a new "
                     "record (default: run until stopped)")
    arc.add_argument("--file-events", type=int, default=100_000, metavar="N", help="events per file at most "
                     "(default 100,000)")
    arc.add_argument("--flush-seconds", type=float, default=60.0, metavar="SECONDS", help="write a partition's "
                     "events at the latest this long after the first of them arrived (default 60)")
    arc.set_defaults(func=cmd_archive)

    par = sub.add_parser("parity", help="online = offline: replay users through a worker and compare each "
                         "recommendation with the offline model's ranking")
    _add_bootstrap(par)
    _add_data(par)
    par.add_argument("--artifact", type=Path, help="artifact (default: CURRENT, if built from --dataset)")
    par.add_argument("--users", type=int, default=200, help="users whose full histories are replayed")
    par.add_argument("--seed", type=int, default=0)
    par.set_defaults(func=cmd_parity)

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    bs = bsub.add_parser("stream", help="events/s and latency of the pipeline beside plain aiokafka and trivial Faust")
    _add_bootstrap(bs)
    bs.add_argument("-n", type=int, default=50_000, help="events to drain per system (default 50,000)")
    bs.add_argument("--users", type=int, default=100_000, help="Zipf-distributed users (default 100,000)")
    bs.add_argument("--items", type=int, default=10_000, help="catalogue size (default 10,000)")
    bs.add_argument("--dim", type=int, default=64)
    bs.add_argument("--systems", default="all",
                    help="comma list of: model (our code alone, no Kafka), aiokafka (plain loop: the ratios' "
                    "denominator), aiokafka-batched (same loop, record-batch sends), faust (trivial agent), "
                    "faust-batch-table (the batch path with a table, no model), lsti (the worker); default all")
    bs.add_argument("--latency-seconds", type=float, default=10.0)
    bs.add_argument("--latency-rate", type=float, help="events/s for the latency run (default: half the sustained)")
    bs.add_argument("--batch-max", type=int, help="worker micro-batch size")
    bs.add_argument("--batch-within", type=float, help="worker micro-batch wait (s)")
    bs.add_argument("--workers", type=int, default=1, help="LSTI worker processes (same group, split partitions)")
    bs.add_argument("--profile", type=Path, help="record a py-spy profile (speedscope JSON) of the worker")
    # the systems that run as processes (streams.bench.stream.PROFILABLE; not imported here: numpy)
    bs.add_argument("--profile-system", default="lsti",
                    choices=("aiokafka", "aiokafka-batched", "faust", "faust-batch-table", "lsti"),
                    help="whose process --profile records (default lsti, the worker; the references run as "
                    "processes of their own too)")
    bs.add_argument("--explain", action="store_true", help="run the model and the worker with explanations on "
                    "(LSTI_EXPLAIN=1: a 'because' per recommended item), to measure their cost")
    bs.add_argument("--json", action="store_true", help="one JSON object on stdout")
    bs.set_defaults(func=cmd_bench)
    br = bsub.add_parser("recovery", help="worker recovery time after a crash for N users' state")
    _add_bootstrap(br)
    br.add_argument("--users", type=int, default=100_000)
    br.add_argument("--json", action="store_true", help="one JSON object on stdout (the default output)")
    br.set_defaults(func=cmd_bench_recovery)
    for name, (module, text) in DELEGATED_BENCHES.items():
        bsub.add_parser(name, help=f"{text} (options: `lsti bench {name} -h`, module {module})")
    return p


DELEGATED_BENCHES = {
    "index": ("streams.bench.index", "FAISS Flat vs IVF vs HNSW: recall@10, QPS, build time"),
    "state": ("streams.bench.state", "state bytes per user, RocksDB size, fp16 vs fp32 quality"),
    "http": ("streams.bench.http", "on-demand recommendations over HTTP: requests/s, p50/p99, routed requests"),
    "model": ("streams.bench.model", "the model path alone per batch size, and the item search per backend"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in DELEGATED_BENCHES:
        import importlib

        return int(importlib.import_module(DELEGATED_BENCHES[argv[1]][0]).main(argv[2:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "events", None) is not None and getattr(args, "dataset_given", False):
        parser.error("--dataset and --events exclude each other: --events reads your own data, --dataset a "
                     "shared one")
    if getattr(args, "events", None) is None and any(getattr(args, k, None) is not None for k in COLUMN_OPTIONS):
        parser.error("the column options (--user-col, --item-col, ...) apply to --events/--items data only")
    if getattr(args, "quiet", None) is False and not sys.stderr.isatty():
        args.quiet = True  # progress bars only on a terminal: in a log they are ~66 KB of redraws per run
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar too
    if args.command == "run":
        # One compute thread per worker process: the math is on micro-batches, and BLAS/OpenMP pools
        # spinning beside the event loop cost more than they give (scale out with processes instead).
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, "1")
    if args.command != "run":
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        if not args.verbose:  # the Kafka clients log every connection at INFO: not what a CLI user reads
            for name in ("kafka", "aiokafka"):
                logging.getLogger(name).setLevel(logging.WARNING)
    from encoders.data_check import DataError

    try:
        return int(args.func(args) or 0)
    except DataError as e:  # refused input data: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
