"""The ``revacnn`` command: train, fork, resume, steer, runs, sql, compare, serve, demo."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from .errors import RevacnnError


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"revacnn: error: {message}\n")
        raise SystemExit(2)


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store", default=os.environ.get("REVACNN_STORE", "store"),
        help="store folder (default: $REVACNN_STORE or ./store)",
    )


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, received {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, received {v}")
    return v


def _layer_spec(text: str) -> tuple[str, str]:
    if ":" not in text:
        raise argparse.ArgumentTypeError(f"expected LAYER:VALUES such as conv2:3,5, received {text!r}")
    layer, rest = text.split(":", 1)
    return layer, rest


def build_parser() -> argparse.ArgumentParser:
    # Literal choices: importing revacnn.models would import TensorFlow for every command.
    DATASETS = ("shapes", "cifar10", "mnist", "fashion_mnist")
    MODELS = ("convnetjs", "revacnn", "resnet20")

    def _model_name(text: str) -> str:
        if text in MODELS or (":" in text and all(part.strip() for part in text.split(":", 1))):
            return text
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose from {', '.join(MODELS)}, or MODULE:FUNCTION naming a function "
            "that returns your Keras model)"
        )

    p = _Parser(prog="revacnn", description="Record, replay and steer CNN training.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a built-in model and record every epoch")
    _store_arg(t)
    t.add_argument("--dataset", default="shapes", choices=DATASETS)
    t.add_argument("--data-dir", default=None)
    t.add_argument("--model", default="convnetjs", type=_model_name, metavar="{" + ",".join(MODELS) + ",MODULE:FUNCTION}",
                   help="a built-in model, or MODULE:FUNCTION naming your factory, called as "
                        "FUNCTION(input_shape, num_classes) (or with no arguments); default convnetjs")
    t.add_argument("--epochs", type=_positive_int, default=10)
    t.add_argument("--batch-size", type=_positive_int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    t.add_argument("--train-size", type=_positive_int, default=10000)
    t.add_argument("--val-size", type=_positive_int, default=2000)
    t.add_argument("--probes", type=_positive_int, default=16)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--name", default=None)
    t.add_argument("--no-embeddings", action="store_true", help="skip t-SNE embeddings")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    f = sub.add_parser("fork", help="branch a new run from a recorded epoch, with changes")
    _store_arg(f)
    f.add_argument("run")
    f.add_argument("--epoch", type=_positive_int, required=True)
    f.add_argument("--freeze", action="append", default=[], metavar="LAYER")
    f.add_argument("--freeze-filters", action="append", default=[], type=_layer_spec, metavar="LAYER:i,j")
    f.add_argument("--add-filters", action="append", default=[], type=_layer_spec, metavar="LAYER:N")
    f.add_argument("--delete-filters", action="append", default=[], type=_layer_spec, metavar="LAYER:i,j")
    f.add_argument("--reinit-filters", action="append", default=[], type=_layer_spec, metavar="LAYER:i,j")
    f.add_argument("--init", choices=["zero", "random"], default=None, help="init of added filters")
    f.add_argument("--lr", type=float, default=None)
    f.add_argument("--epochs", type=_positive_int, default=None)
    f.add_argument("--name", default=None)
    f.add_argument("--quiet", action="store_true")

    r = sub.add_parser("resume", help="continue an interrupted run from its last committed epoch")
    _store_arg(r)
    r.add_argument("run")
    r.add_argument("--quiet", action="store_true")

    s = sub.add_parser("steer", help="send a steering command to a running training")
    _store_arg(s)
    s.add_argument("run")
    s.add_argument("op")
    s.add_argument("args", nargs="*")
    s.add_argument("--init", choices=["zero", "random"], default=None)
    s.add_argument("--timeout", type=float, default=30.0)

    ru = sub.add_parser("runs", help="the sessions and their fork trees")
    _store_arg(ru)

    q = sub.add_parser("sql", help="read-only SQL over the store's tables")
    _store_arg(q)
    q.add_argument("query")
    q.add_argument("--format", choices=["table", "csv", "json"], default="table")

    c = sub.add_parser("compare", help="per-epoch metric differences of two runs")
    _store_arg(c)
    c.add_argument("run_a")
    c.add_argument("run_b")
    c.add_argument("--format", choices=["table", "csv", "json"], default="table")

    sv = sub.add_parser("serve", help="serve the Panel app")
    _store_arg(sv)
    sv.add_argument("app", nargs="?", default="replay", choices=["replay", "live"])
    sv.add_argument("--port", type=int, default=5006)
    sv.add_argument("--address", default="127.0.0.1")
    sv.add_argument("--show", action="store_true", help="open a browser")
    sv.add_argument("--basic-auth", default=None, metavar="PASSWORD|FILE",
                    help="require a login (needed for steering when --address is not 127.0.0.1)")

    d = sub.add_parser("demo", help="record the demo session (a root run and a fork), then serve the app")
    _store_arg(d)
    d.add_argument("--epochs", type=_positive_int, default=6)
    d.add_argument("--no-serve", action="store_true")
    d.add_argument("--port", type=int, default=5006)
    return p


def _print_df(df: Any, fmt: str) -> None:
    if fmt == "csv":
        df.to_csv(sys.stdout, index=False)
    elif fmt == "json":
        sys.stdout.write(df.to_json(orient="records", date_format="iso") + "\n")
    else:
        import pandas as pd

        with pd.option_context("display.max_rows", 200, "display.max_columns", 50, "display.width", 200):
            sys.stdout.write((df.to_string(index=False) if len(df) else "(no rows)") + "\n")


def _fork_changes(args: argparse.Namespace) -> list[Any]:
    from .steering import parse

    changes = [parse("freeze", [layer]) for layer in args.freeze]
    for op, specs in (
        ("freeze-filters", args.freeze_filters),
        ("delete-filters", args.delete_filters),
        ("reinit-filters", args.reinit_filters),
    ):
        for layer, idx in specs:
            changes.append(parse(op, [layer, idx]))
    for layer, n in args.add_filters:
        changes.append(parse("add-filters", [layer, n], init=args.init))
    return changes


def cmd_train(args: argparse.Namespace) -> int:
    from . import open_store
    from .config import TrainConfig
    from .trainer import train

    cfg = TrainConfig(
        dataset=args.dataset, data_dir=args.data_dir, model=args.model, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer, train_size=args.train_size,
        val_size=args.val_size, probes=args.probes, seed=args.seed, name=args.name,
        embeddings=not args.no_embeddings,
    ).validate()
    store = open_store(args.store)

    def started(run_id: str) -> None:
        print(run_id, flush=True)

    run = train(cfg, store, progress=not args.quiet, on_start=started)
    print(f"{run.run_id} {run.status}: query it with  revacnn sql --store {args.store} "
          f"\"SELECT epoch, val_accuracy FROM epochs WHERE run_id = '{run.run_id}'\"", file=sys.stderr)
    return 0 if run.status in ("finished", "stopped") else 1


def cmd_fork(args: argparse.Namespace) -> int:
    from . import open_store
    from .trainer import fork

    store = open_store(args.store, mode="r")
    changes = _fork_changes(args)
    run = fork(store, args.run, args.epoch, changes=changes, epochs=args.epochs, lr=args.lr, name=args.name,
               progress=not args.quiet, on_start=lambda rid: print(rid, flush=True))
    return 0 if run.status in ("finished", "stopped") else 1


def cmd_resume(args: argparse.Namespace) -> int:
    from . import open_store
    from .trainer import resume

    store = open_store(args.store, mode="r")
    run = resume(store, args.run, progress=not args.quiet)
    print(f"{run.run_id} {run.status}")
    return 0 if run.status in ("finished", "stopped") else 1


def cmd_steer(args: argparse.Namespace) -> int:
    from . import open_store
    from .steering import parse, send, wait_for_event

    store = open_store(args.store, mode="r")
    run = store.run(args.run)
    cmd = parse(args.op, args.args, init=args.init)
    status = run.status
    if status != "running":
        print(f"rejected: run {run.run_id} is {status}, not running")
        return 1
    send(store, run.run_id, cmd)
    ev = wait_for_event(store, run.run_id, cmd.command_id, timeout_s=args.timeout)
    if ev is None:
        print(f"rejected: no answer from the trainer within {args.timeout:g} s (the command stays queued)")
        return 1
    where = f"epoch {ev['epoch']} batch {ev['batch']}"
    if ev["status"] == "applied":
        print(f"applied at {where}: {ev['message']}")
        return 0
    print(f"rejected: {ev['message']}")
    return 1


def cmd_runs(args: argparse.Namespace) -> int:
    from . import open_store
    from .storage.tree import format_tree

    store = open_store(args.store, mode="r")
    print(format_tree(store))
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    from . import open_store

    store = open_store(args.store, mode="r")
    _print_df(store.sql(args.query), args.format)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from . import open_store
    from .storage.compare import compare_runs

    store = open_store(args.store, mode="r")
    _print_df(compare_runs(store, args.run_a, args.run_b), args.format)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from . import open_store
    from .ui.serve import serve

    open_store(args.store, mode="a")
    return serve(args.app, store=args.store, port=args.port, address=args.address, show=args.show,
                 basic_auth=args.basic_auth)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.store, epochs=args.epochs, serve_app=not args.no_serve, port=args.port)


COMMANDS = {
    "train": cmd_train,
    "fork": cmd_fork,
    "resume": cmd_resume,
    "steer": cmd_steer,
    "runs": cmd_runs,
    "sql": cmd_sql,
    "compare": cmd_compare,
    "serve": cmd_serve,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; bad input prints one line on stderr and returns 2."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.cmd](args)
    except RevacnnError as exc:
        sys.stderr.write(f"revacnn {args.cmd}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("revacnn: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
