"""The ``revacnn`` command: train, fork, resume, steer, runs, sql, compare, gc, serve, demo."""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, RevacnnError, SteeringError


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store", default=os.environ.get("REVACNN_STORE", "store"),
        help="the store folder (default: %(default)s; $REVACNN_STORE, if set, changes the default)",
    )


# ---------------------------------------------------------------- argument types (no TensorFlow)
def _int_at_least(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``lo..hi``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, received {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            want = f">= {lo}" if hi is None else f"from {lo} to {hi}"
            raise argparse.ArgumentTypeError(f"expected an integer {want}, received {v}")
        return v

    parse.__name__ = "integer"
    return parse


_non_negative = _int_at_least(0)
_count = _int_at_least(1)
_port = _int_at_least(0, 65535)
_seed = _int_at_least(0, 2**32 - 1)


def _positive_float(text: str) -> float:
    """An argparse type: a finite number > 0 (a learning rate, a timeout)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, received {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, received {text!r}")
    return v


def _text(text: str) -> str:
    """An argparse type: a non-blank string (a name, a query)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a non-empty value, received {text!r}")
    return text


def _layer_spec(text: str) -> tuple[str, str]:
    if ":" not in text:
        raise argparse.ArgumentTypeError(f"expected LAYER:VALUES such as conv2:3,5, received {text!r}")
    layer, rest = text.split(":", 1)
    if not layer.strip() or not rest.strip():
        raise argparse.ArgumentTypeError(f"expected LAYER:VALUES such as conv2:3,5, received {text!r}")
    return layer, rest


def build_parser() -> argparse.ArgumentParser:
    """The ``revacnn`` argument parser; every option's help says what it does and its default."""
    # Literal choices: importing revacnn.models would import TensorFlow for every command.
    DATASETS = ("shapes", "cifar10", "mnist", "fashion_mnist")
    MODELS = ("convnetjs", "revacnn", "resnet20")
    FORMATS = ["table", "csv", "json"]

    def _model_name(text: str) -> str:
        if text in MODELS or (":" in text and all(part.strip() for part in text.split(":", 1))):
            return text
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose from {', '.join(MODELS)}, or MODULE:FUNCTION naming a function "
            "that returns your Keras model)"
        )

    p = _Parser(prog="revacnn", description="Record, replay and steer CNN training.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser, metavar="COMMAND")

    t = sub.add_parser("train", help="train a built-in model and record every epoch")
    _store_arg(t)
    t.add_argument("--dataset", default="shapes", choices=DATASETS,
                   help="the dataset; shapes is generated offline (default: %(default)s)")
    t.add_argument("--data-dir", default=None, metavar="DIR",
                   help="a local copy of the dataset, e.g. cifar-10-batches-py or its .tar.gz "
                        "(default: the Keras download cache)")
    t.add_argument("--model", default="convnetjs", type=_model_name,
                   metavar="{" + ",".join(MODELS) + ",MODULE:FUNCTION}",
                   help="a built-in model, or MODULE:FUNCTION naming your own factory, called as "
                        "FUNCTION(input_shape, num_classes) or with no arguments (default: %(default)s)")
    t.add_argument("--epochs", type=_non_negative, default=10, metavar="N",
                   help="epochs to train; epoch 0, the initial state, is recorded too (default: %(default)s)")
    t.add_argument("--batch-size", type=_count, default=64, metavar="B",
                   help="examples per gradient step (default: %(default)s)")
    t.add_argument("--lr", type=_positive_float, default=1e-3, metavar="X",
                   help="learning rate, a number > 0; steerable while training (default: %(default)s)")
    t.add_argument("--optimizer", default="adam", choices=["adam", "sgd"],
                   help="the optimizer; sgd uses momentum 0.9 (default: %(default)s)")
    t.add_argument("--train-size", type=_count, default=10000, metavar="N",
                   help="training examples drawn from the training split (default: %(default)s)")
    t.add_argument("--val-size", type=_count, default=2000, metavar="N",
                   help="validation examples drawn from the validation split (default: %(default)s)")
    t.add_argument("--probes", type=_count, default=16, metavar="P",
                   help="probe images whose activations are recorded every epoch, taken from the "
                        "validation images (default: %(default)s)")
    t.add_argument("--seed", type=_seed, default=0, metavar="S",
                   help="seed of the weights, data order, dropout and probes (default: %(default)s)")
    t.add_argument("--name", type=_text, default=None,
                   help="a human name for the run (default: none, the run id names it)")
    t.add_argument("--no-embeddings", action="store_true",
                   help="skip the t-SNE embeddings of the filters (default: computed)")
    t.add_argument("--auto-freeze", action="store_true",
                   help="freeze conv layers bottom-up once the filter doctor finds them converged, "
                        "as recorded events (default: off; see docs/diagnoses.md)")
    t.add_argument("--checkpoint-every", type=_count, default=1, metavar="K",
                   help="exact checkpoint every K epochs, and at epoch 0, the last epoch and fork points; "
                        "forks from other epochs replay from the nearest earlier one (default: %(default)s)")
    t.add_argument("--strategy", default="none", choices=["none", "mirrored", "multiworker"],
                   help="tf.distribute: mirrored = every local GPU (MirroredStrategy), multiworker = "
                        "the workers of $TF_CONFIG (MultiWorkerMirroredStrategy; run the same command "
                        "on every worker, the chief records); --batch-size is the global batch "
                        "(default: %(default)s, one device)")
    t.add_argument("--quiet", action="store_true", help="no progress bar (default: show one)")

    f = sub.add_parser("fork", help="branch a new run from a recorded epoch, with changes")
    _store_arg(f)
    f.add_argument("run", help="the parent run's id")
    f.add_argument("--epoch", type=_non_negative, required=True, metavar="K",
                   help="the parent's recorded epoch to branch from (required)")
    f.add_argument("--freeze", action="append", default=[], metavar="LAYER",
                   help="freeze a layer; repeat for more (default: none)")
    f.add_argument("--freeze-filters", action="append", default=[], type=_layer_spec, metavar="LAYER:i,j",
                   help="freeze filters i, j ... of a layer; repeatable (default: none)")
    f.add_argument("--add-filters", action="append", default=[], type=_layer_spec, metavar="LAYER:N",
                   help="add N new filters to a layer; repeatable (default: none)")
    f.add_argument("--delete-filters", action="append", default=[], type=_layer_spec, metavar="LAYER:i,j",
                   help="delete filters i, j ... of a layer, at least one must remain; repeatable "
                        "(default: none)")
    f.add_argument("--reinit-filters", action="append", default=[], type=_layer_spec, metavar="LAYER:i,j",
                   help="re-initialise filters i, j ... of a layer; repeatable (default: none)")
    f.add_argument("--init", choices=["zero", "random"], default=None,
                   help="initial weights of the filters --add-filters adds (default: zero)")
    f.add_argument("--lr", type=_positive_float, default=None, metavar="X",
                   help="a new learning rate from the fork point on (default: the parent's)")
    f.add_argument("--epochs", type=_non_negative, default=None, metavar="N",
                   help="the final epoch, counted from the parent's start as in Keras "
                        "fit(initial_epoch=K, epochs=N): the fork trains epochs K+1..N "
                        "(default: the parent's final epoch)")
    f.add_argument("--name", type=_text, default=None,
                   help="a human name for the fork (default: none, the run id names it)")
    f.add_argument("--auto-freeze", action="store_true", default=None,
                   help="freeze converged conv layers bottom-up from the fork point on "
                        "(default: as the parent)")
    f.add_argument("--checkpoint-every", type=_count, default=None, metavar="K",
                   help="the fork's checkpoint retention: every K epochs (default: the parent's)")
    f.add_argument("--strategy", default="none", choices=["none", "mirrored"],
                   help="train the fork on one device or under MirroredStrategy, whatever the parent "
                        "ran under (default: %(default)s)")
    f.add_argument("--quiet", action="store_true", help="no progress bar (default: show one)")
    f.add_argument("--dry-run", action="store_true",
                   help="print the surgery plan (every layer and channel each change touches) and "
                        "apply nothing (default: off)")

    r = sub.add_parser("resume", help="continue an interrupted run from its last committed epoch")
    _store_arg(r)
    r.add_argument("run", help="the id of the interrupted run")
    r.add_argument("--strategy", default="none", choices=["none", "mirrored"],
                   help="continue on one device or under MirroredStrategy, whatever the run was "
                        "recorded under (default: %(default)s)")
    r.add_argument("--quiet", action="store_true", help="no progress bar (default: show one)")

    s = sub.add_parser("steer", help="send a steering command to a running training")
    _store_arg(s)
    s.add_argument("run", help="the id of the running run")
    s.add_argument("op", help="freeze, unfreeze, freeze-filters, unfreeze-filters, add-filters, "
                              "delete-filters, reinit-filters, set-lr, pause, resume or stop")
    s.add_argument("args", nargs="*", help="the op's arguments: LAYER, then filter indices or N; X for set-lr")
    s.add_argument("--init", choices=["zero", "random"], default=None,
                   help="initial weights of the filters add-filters adds (default: zero)")
    s.add_argument("--timeout", type=_positive_float, default=30.0, metavar="SECONDS",
                   help="how long to wait for the trainer's answer (default: %(default)s)")
    s.add_argument("--dry-run", action="store_true",
                   help="print the surgery plan against the last committed epoch and send nothing "
                        "(default: off)")

    ru = sub.add_parser("runs", help="the sessions and their fork trees")
    _store_arg(ru)

    q = sub.add_parser("sql", help="read-only SQL over the store's tables")
    _store_arg(q)
    q.add_argument("query", type=_text, help="one SELECT statement")
    q.add_argument("--format", choices=FORMATS, default="table", help="output format (default: %(default)s)")

    c = sub.add_parser("compare", help="per-epoch metric differences of two runs")
    _store_arg(c)
    c.add_argument("run_a", help="the first run's id")
    c.add_argument("run_b", help="the second run's id (differences are b - a)")
    c.add_argument("--format", choices=FORMATS, default="table", help="output format (default: %(default)s)")

    g = sub.add_parser("gc", help="remove the checkpoints no fork or resume can need")
    _store_arg(g)
    g.add_argument("--dry-run", action="store_true", help="only print what would be removed (default: remove)")
    g.add_argument("--keep-every", type=_count, default=None, metavar="K",
                   help="thin every run to a checkpoint every K epochs (plus first, last and fork points; "
                        "default: each run's own --checkpoint-every)")

    sv = sub.add_parser("serve", help="serve the Panel app")
    _store_arg(sv)
    sv.add_argument("app", nargs="?", default="replay", choices=["replay", "live"],
                    help="the app shown at / (both are served; default: %(default)s)")
    sv.add_argument("--port", type=_port, default=5006,
                    help="the TCP port, 0 for any free one (default: %(default)s)")
    sv.add_argument("--address", type=_text, default="127.0.0.1",
                    help="the interface to listen on (default: %(default)s, this machine only)")
    sv.add_argument("--show", action="store_true", help="open a browser (default: do not)")
    sv.add_argument("--basic-auth", default=None, metavar="PASSWORD|FILE",
                    help="require a login; needed for steering when --address is not 127.0.0.1 "
                         "(default: none)")

    d = sub.add_parser("demo", help="record the demo session (a root run and a fork), then serve the app")
    _store_arg(d)
    d.add_argument("--epochs", type=_count, default=6, metavar="N",
                   help="epochs of the root run; the fork branches at epoch 2 (default: %(default)s)")
    d.add_argument("--no-serve", action="store_true", help="record only, do not serve (default: serve)")
    d.add_argument("--port", type=_port, default=5006,
                   help="the TCP port of the app, 0 for any free one (default: %(default)s)")
    return p


# ---------------------------------------------------------------- checks before any TensorFlow import
def _open(args: argparse.Namespace, mode: str = "r") -> Any:
    from . import open_store

    path = Path(args.store)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"Received: --store {args.store} (a file; expected a store folder)")
    return open_store(args.store, mode=mode)


def _check_listen(address: str, port: int) -> None:
    """Refuse an address this machine cannot listen on, or a port already taken."""
    try:
        infos = socket.getaddrinfo(address, port or None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"Received: --address {address} (not an address of this machine: {exc})") from None
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            raise ConfigError(
                f"Received: --address {address} --port {port} (cannot listen there: {exc.strerror})"
            ) from None


def _check_fork(store: Any, args: argparse.Namespace, changes: list[Any]) -> None:
    """Refuse a fork whose epoch, --epochs or changes do not fit the recorded epoch."""
    run = store.run(args.run)
    rec = run.epoch(args.epoch)  # EpochNotFoundError names the recorded epochs
    if args.epochs is not None and args.epochs < args.epoch:
        raise ConfigError(
            f"Received: --epochs {args.epochs} with --epoch {args.epoch} (expected a final epoch >= "
            f"{args.epoch}: --epochs is the last epoch, as in Keras fit(initial_epoch, epochs))"
        )
    if args.init is not None and not args.add_filters:
        raise ConfigError(f"Received: --init {args.init} without --add-filters (it sets their initial weights)")
    counts = {}
    for name in rec.layer_names:
        counts[name] = rec.layer(name).n_filters
    for cmd in changes:  # in the order the fork applies them
        layer = cmd.args.get("layer")
        if layer not in counts:
            raise ConfigError(
                f"Received: --{cmd.op} {layer} (run {run.run_id} epoch {args.epoch} has layers "
                f"{', '.join(counts)})"
            )
        n = counts[layer]
        idx = cmd.args.get("indices")
        if idx is not None:
            bad = sorted(i for i in idx if not 0 <= i < n)
            if bad:
                raise ConfigError(
                    f"Received: --{cmd.op} {layer}:{','.join(map(str, idx))} ({layer} has {n} filters: "
                    f"0..{n - 1})"
                )
            if len(set(idx)) != len(idx):
                raise ConfigError(f"Received: --{cmd.op} {layer}:{','.join(map(str, idx))} (duplicate indices)")
            if cmd.op == "delete-filters":
                if len(idx) >= n:
                    raise ConfigError(
                        f"Received: --delete-filters {layer}:{','.join(map(str, idx))}, every filter of "
                        f"{layer} ({n}); at least one must remain"
                    )
                counts[layer] = n - len(idx)
        if cmd.op == "add-filters":
            if cmd.args["n"] < 1:
                raise ConfigError(f"Received: --add-filters {layer}:{cmd.args['n']} (expected N >= 1)")
            counts[layer] = n + cmd.args["n"]


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
    from .config import TrainConfig

    cfg = TrainConfig(
        dataset=args.dataset, data_dir=args.data_dir, model=args.model, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer, train_size=args.train_size,
        val_size=args.val_size, probes=args.probes, seed=args.seed, name=args.name,
        embeddings=not args.no_embeddings, auto_freeze=args.auto_freeze, checkpoint_every=args.checkpoint_every,
    ).validate()
    if args.data_dir is not None and not Path(args.data_dir).exists():
        raise ConfigError(f"Received: --data-dir {args.data_dir} (no such folder or file)")
    store = _open(args, mode="a")
    from .trainer.distribute import is_chief, make_strategy

    strategy = make_strategy(args.strategy)  # before any other TensorFlow work
    from .trainer import train

    def started(run_id: str) -> None:
        print(run_id, flush=True)

    run = train(cfg, store, progress=not args.quiet, on_start=started, strategy=strategy)
    if strategy is not None and not is_chief(strategy):
        return 0  # the chief reports the run
    print(f"{run.run_id} {run.status}: query it with  revacnn sql --store {args.store} "
          f"\"SELECT epoch, val_accuracy FROM epochs WHERE run_id = '{run.run_id}'\"", file=sys.stderr)
    return 0 if run.status in ("finished", "stopped") else 1


def cmd_fork(args: argparse.Namespace) -> int:
    store = _open(args)
    changes = _fork_changes(args)
    _check_fork(store, args, changes)
    if args.dry_run:
        return _dry_run(store, args.run, changes, args.epoch)
    from .trainer.distribute import make_strategy

    strategy = make_strategy(args.strategy)
    from .trainer import fork

    run = fork(store, args.run, args.epoch, changes=changes, epochs=args.epochs, lr=args.lr, name=args.name,
               progress=not args.quiet, on_start=lambda rid: print(rid, flush=True),
               auto_freeze=args.auto_freeze, checkpoint_every=args.checkpoint_every,
               strategy=strategy)
    return 0 if run.status in ("finished", "stopped") else 1


def cmd_resume(args: argparse.Namespace) -> int:
    store = _open(args)
    run = store.run(args.run)
    status = run.status
    if status in ("finished", "running"):
        if status == "running":
            info = run.status_info
            why = (f"its trainer, pid {info.get('pid', '?')} on {info.get('host', '?')}, is alive "
                   "and holds the run's lease")
        else:
            why = "fork it to train further"
        raise ConfigError(f"Run {run.run_id} is {status}, nothing to resume ({why})")
    if not run.epochs():
        raise ConfigError(f"Run {run.run_id} has no committed epoch to resume from")
    from .trainer.distribute import make_strategy

    strategy = make_strategy(args.strategy)
    from .trainer import resume

    run = resume(store, args.run, progress=not args.quiet, strategy=strategy)
    print(f"{run.run_id} {run.status}")
    return 0 if run.status in ("finished", "stopped") else 1


def cmd_steer(args: argparse.Namespace) -> int:
    from .steering import parse, send, wait_for_event

    cmd = parse(args.op, args.args, init=args.init)
    if cmd.op == "set-lr" and not (math.isfinite(cmd.args["lr"]) and cmd.args["lr"] > 0):
        raise SteeringError(f"set-lr: X must be a finite number > 0. Received: {args.args[0]!r}")
    if cmd.op == "add-filters" and cmd.args["n"] < 1:
        raise SteeringError(f"add-filters: N must be >= 1. Received: {cmd.args['n']}")
    store = _open(args)
    run = store.run(args.run)
    if args.dry_run:
        return _dry_run(store, run.run_id, [cmd], None)
    status = run.status
    if status != "running":
        raise SteeringError(
            f"Run {run.run_id} is {status}, not running: only a running training can be steered "
            "(fork it to change a recorded epoch)"
        )
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


def _dry_run(store: Any, run_id: str, changes: list[Any], epoch: int | None) -> int:
    from .trainer.preview import format_preview, preview

    at, plans = preview(store, run_id, changes, epoch=epoch)
    print(format_preview(at, plans))
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from .storage.tree import format_tree

    print(format_tree(_open(args)))
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    _print_df(_open(args).sql(args.query), args.format)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .storage.compare import compare_runs

    if args.run_a == args.run_b:
        raise ConfigError(f"Received the same run twice: {args.run_a} (expected two different runs)")
    _print_df(compare_runs(_open(args), args.run_a, args.run_b), args.format)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from .storage.checkpoints import collect

    items = collect(_open(args), dry_run=args.dry_run, every=args.keep_every)
    verb = "would free" if args.dry_run else "freed"
    by_run: dict[str, list[Any]] = {}
    for it in items:
        by_run.setdefault(it.run_id, []).append(it)
    for rid, its in by_run.items():
        epochs = sorted(i.epoch for i in its if i.epoch is not None)
        others = sum(1 for i in its if i.epoch is None)
        what = (f"checkpoints of epochs {', '.join(map(str, epochs))}" if epochs else "")
        what += (" and " if what and others else "") + (f"{others} temporary file(s)" if others else "")
        print(f"{rid}: {verb} {sum(i.nbytes for i in its) / 1e6:.2f} MB ({what})")
    total = sum(i.nbytes for i in items)
    print(f"{verb} {total / 1e6:.2f} MB in {len(items)} file(s) of {len(by_run)} run(s)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    _check_listen(args.address, args.port)
    _open(args, mode="a")
    from .ui.serve import serve

    return serve(args.app, store=args.store, port=args.port, address=args.address, show=args.show,
                 basic_auth=args.basic_auth)


def cmd_demo(args: argparse.Namespace) -> int:
    if not args.no_serve:
        _check_listen("127.0.0.1", args.port)  # before minutes of training
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
    "gc": cmd_gc,
    "serve": cmd_serve,
    "demo": cmd_demo,
}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _one_line_store_warnings(cmd: str) -> None:
    """Show a corrupt file skipped by a store-wide read as one line on stderr (other warnings as usual)."""
    import warnings

    from .errors import CorruptStoreWarning

    default = warnings.showwarning
    default = getattr(default, "_revacnn_default", default)  # main() called again in one process

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202
        if issubclass(category, CorruptStoreWarning):
            sys.stderr.write(f"revacnn {cmd}: warning: {message}\n")
        else:
            default(message, category, filename, lineno, file, line)

    show._revacnn_default = default  # type: ignore[attr-defined]
    warnings.showwarning = show


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; bad input prints one line on stderr and returns 2."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = build_parser().parse_args(argv)
    _one_line_store_warnings(args.cmd)
    try:
        return COMMANDS[args.cmd](args)
    except RevacnnError as exc:
        sys.stderr.write(f"revacnn {args.cmd}: error: {_one_line(exc)}\n")
        return 2
    except OSError as exc:  # an unreadable or unwritable path given by the user
        sys.stderr.write(f"revacnn {args.cmd}: error: {_one_line(exc)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("revacnn: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
