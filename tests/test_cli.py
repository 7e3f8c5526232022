"""The `revacnn` command: bad input gives one line on stderr and exit code 2; queries print rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from revacnn.cli import main


def run_cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory):
    """A store with one short `revacnn train` run, made through the CLI."""
    path = tmp_path_factory.mktemp("cli") / "store"
    code = main(["train", "--store", str(path), "--epochs", "1", "--train-size", "256", "--val-size", "64",
                 "--probes", "4", "--quiet", "--name", "cli-run", "--no-embeddings"])
    assert code == 0
    return path


@pytest.mark.parametrize(
    "query, fragment",
    [
        ("DELETE FROM epochs", "Only SELECT"),
        ("SELECT * FROM read_csv('/etc/passwd')", "cannot read or write files"),
        ("SELECT nonsense FROM epochs", "SQL error"),
    ],
)
def test_sql_refusals(cli_store, query, fragment, capsys):
    code, out, err = run_cli(["sql", query, "--store", str(cli_store)], capsys)
    assert code == 2 and fragment in err and "root:" not in out + err
    assert len(err.strip().splitlines()) == 1


def test_train_prints_run_id_first_and_sql_formats(cli_store, capsys):
    code, out, _ = run_cli(["sql", "SELECT run_id, name, status FROM runs", "--store", str(cli_store),
                            "--format", "json"], capsys)
    assert code == 0
    rows = json.loads(out)
    assert rows[0]["name"] == "cli-run" and rows[0]["status"] == "finished"
    code, out, _ = run_cli(["sql", "SELECT epoch FROM epochs ORDER BY epoch", "--store", str(cli_store),
                            "--format", "csv"], capsys)
    assert out.split() == ["epoch", "0", "1"]
    code, out, _ = run_cli(["runs", "--store", str(cli_store)], capsys)
    assert code == 0 and "cli-run" in out and "dataset=shapes" in out


def test_steer_and_fork_bad_targets(cli_store, capsys):
    code, _, err = run_cli(["steer", "run-nope", "freeze", "conv1", "--store", str(cli_store)], capsys)
    assert code == 2 and "run-nope" in err
    rid = json.loads(run_cli(["sql", "SELECT run_id FROM runs", "--store", str(cli_store), "--format", "json"],
                             capsys)[1])[0]["run_id"]
    code, _, err = run_cli(["steer", rid, "explode", "--store", str(cli_store)], capsys)
    assert code == 2 and "Unknown steering op" in err
    code, _, err = run_cli(["fork", rid, "--epoch", "7", "--store", str(cli_store)], capsys)
    assert code == 2 and "no committed epoch 7" in err
    code, _, err = run_cli(["fork", "run-nope", "--epoch", "0", "--store", str(cli_store)], capsys)
    assert code == 2 and "run-nope" in err


# ---------------------------------------------------------------- bad input, every command
# Placeholders: {store} the recorded store, {run} its run, {conv1_all} every filter index of conv1,
# {busy} a port something listens on, {file} a regular file, {missing} a path that does not exist.
BAD_INPUT = [
    # train
    (["train", "--lr", "nan"], "argument --lr: expected a finite number > 0, received 'nan'"),
    (["train", "--lr", "inf"], "argument --lr: expected a finite number > 0"),
    (["train", "--lr", "-0.1"], "argument --lr: expected a finite number > 0"),
    (["train", "--lr", "fast"], "argument --lr: expected a number > 0, received 'fast'"),
    (["train", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1, received 0"),
    (["train", "--probes", "0"], "argument --probes: expected an integer >= 1, received 0"),
    (["train", "--optimizer", "lbfgs"], "argument --optimizer: invalid choice: 'lbfgs'"),
    (["train", "--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["train", "--model", "resnet"], "resnet"),
    (["train", "--epochs", "-1"], "argument --epochs: expected an integer >= 0, received -1"),
    (["train", "--epochs", "two"], "expected an integer, received 'two'"),
    (["train", "--train-size", "0"], "argument --train-size: expected an integer >= 1"),
    (["train", "--val-size", "-5"], "argument --val-size: expected an integer >= 1"),
    (["train", "--seed", "-1"], "argument --seed: expected an integer from 0 to 4294967295"),
    (["train", "--batch-size", "1.5"], "argument --batch-size: expected an integer, received '1.5'"),
    (["train", "--data-dir", "{missing}"], "--data-dir {missing} (no such folder or file)"),
    (["train", "--name", " "], "argument --name: expected a non-empty value"),
    (["train", "--store", "{file}"], "(a file; expected a store folder)"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    # fork
    (["fork", "{run}", "--store", "{store}"], "the following arguments are required: --epoch"),
    (["fork", "{run}", "--epoch", "7", "--store", "{store}"], "no committed epoch 7"),
    (["fork", "run-nope", "--epoch", "0", "--store", "{store}"], "run-nope"),
    (["fork", "{run}", "--epoch", "0", "--delete-filters", "conv1:{conv1_all}", "--store", "{store}"],
     "every filter of conv1"),
    (["fork", "{run}", "--epoch", "0", "--delete-filters", "conv1:99", "--store", "{store}"], "conv1 has 16 filters"),
    (["fork", "{run}", "--epoch", "0", "--delete-filters", "conv1:1,1", "--store", "{store}"], "duplicate"),
    (["fork", "{run}", "--epoch", "0", "--freeze", "conv9", "--store", "{store}"], "--freeze conv9 (run "),
    (["fork", "{run}", "--epoch", "1", "--epochs", "0", "--store", "{store}"], "expected a final epoch >= 1"),
    (["fork", "{run}", "--epoch", "0", "--add-filters", "conv1:0", "--store", "{store}"], "expected N >= 1"),
    (["fork", "{run}", "--epoch", "0", "--add-filters", "conv1:many", "--store", "{store}"], "must be an integer"),
    (["fork", "{run}", "--epoch", "0", "--freeze-filters", "conv1", "--store", "{store}"], "expected LAYER:VALUES"),
    (["fork", "{run}", "--epoch", "0", "--init", "random", "--store", "{store}"], "without --add-filters"),
    (["fork", "{run}", "--epoch", "0", "--lr", "0", "--store", "{store}"], "argument --lr: expected a finite"),
    (["fork", "{run}", "--epoch", "-2", "--store", "{store}"], "argument --epoch: expected an integer >= 0"),
    # resume
    (["resume", "{run}", "--store", "{store}"], "is finished, nothing to resume"),
    (["resume", "run-nope", "--store", "{store}"], "run-nope"),
    (["resume", "--store", "{store}"], "the following arguments are required: run"),
    # steer
    (["steer", "{run}", "freeze", "conv1", "--store", "{store}"], "is finished, not running"),
    (["steer", "{run}", "explode", "--store", "{store}"], "Unknown steering op"),
    (["steer", "{run}", "set-lr", "nan", "--store", "{store}"], "finite number > 0"),
    (["steer", "{run}", "add-filters", "conv1", "0", "--store", "{store}"], "N must be >= 1"),
    (["steer", "{run}", "freeze", "conv1", "--init", "zero", "--store", "{store}"], "--init applies to add-filters"),
    (["steer", "{run}", "freeze", "--store", "{store}"], "freeze needs LAYER"),
    (["steer", "{run}", "freeze", "conv1", "--timeout", "0", "--store", "{store}"], "argument --timeout"),
    (["steer", "run-nope", "freeze", "conv1", "--store", "{store}"], "run-nope"),
    # runs
    (["runs", "--store", "{missing}"], "No revacnn store"),
    (["gc", "--store", "{missing}"], "No revacnn store"),
    (["gc", "--keep-every", "0"], "argument --keep-every: expected an integer >= 1, received 0"),
    (["train", "--checkpoint-every", "0"], "argument --checkpoint-every: expected an integer >= 1, received 0"),
    (["runs", "--store", "{file}"], "(a file; expected a store folder)"),
    # sql
    (["sql", "", "--store", "{store}"], "argument query: expected a non-empty value"),
    (["sql", "DELETE FROM epochs", "--store", "{store}"], "Only SELECT"),
    (["sql", "SELECT content FROM read_text('/etc/hostname')", "--store", "{store}"], "cannot read or write files"),
    (["sql", "SELECT 1", "--format", "xml", "--store", "{store}"], "argument --format: invalid choice: 'xml'"),
    (["sql", "SELECT 1", "--store", "{missing}"], "No revacnn store"),
    # compare
    (["compare", "{run}", "run-nope", "--store", "{store}"], "run-nope"),
    (["compare", "{run}", "{run}", "--store", "{store}"], "the same run twice"),
    (["compare", "{run}", "--store", "{store}"], "the following arguments are required: run_b"),
    # serve
    (["serve", "--port", "99999"], "argument --port: expected an integer from 0 to 65535, received 99999"),
    (["serve", "--port", "-1"], "argument --port: expected an integer from 0 to 65535"),
    (["serve", "museum"], "invalid choice: 'museum'"),
    (["serve", "--address", "256.1.1.1", "--port", "0"], "--address 256.1.1.1 (not an address"),
    (["serve", "--port", "{busy}"], "cannot listen there"),
    # demo
    (["demo", "--epochs", "0"], "argument --epochs: expected an integer >= 1, received 0"),
    (["demo", "--port", "99999"], "argument --port: expected an integer from 0 to 65535"),
    (["demo", "--port", "{busy}"], "cannot listen there"),
    # no command, unknown command
    ([], "the following arguments are required: COMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.fixture(scope="module")
def busy_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _fill(argv, request, tmp_path):
    """Replace the placeholders of one table row; only rows that need the recorded store train it."""
    values = {"missing": str(tmp_path / "no-such-path"), "file": str(tmp_path / "a-file.txt")}
    (tmp_path / "a-file.txt").write_text("not a store\n")
    text = " ".join(argv)
    if "{busy}" in text:
        values["busy"] = str(request.getfixturevalue("busy_port"))
    if "{store}" in text or "{run}" in text:
        store = request.getfixturevalue("cli_store")
        import revacnn

        st = revacnn.open_store(store, mode="r")
        run_id = st.run_ids()[0]
        n = st.run(run_id).epoch(0).layer("conv1").n_filters
        values.update(store=str(store), run=run_id, conv1_all=",".join(map(str, range(n))))
    return [a.format(**values) for a in argv], values


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("argv, fragment", BAD_INPUT, ids=[" ".join(a) or "(none)" for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(argv, fragment, request, tmp_path, monkeypatch, capsys):
    argv, values = _fill(argv, request, tmp_path)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # the default store, ./store, would appear here
    monkeypatch.delenv("REVACNN_STORE", raising=False)
    before = _listing(Path(values["store"])) if "store" in values else None
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), err
    assert fragment.format(**values) in lines[0]
    assert lines[0].startswith("revacnn")
    assert "Traceback" not in err + out
    assert _listing(work) == [] and not Path(values["missing"]).exists()  # nothing created
    if before is not None:
        assert _listing(Path(values["store"])) == before  # nothing written to the store


def test_the_table_covers_every_command():
    from revacnn.cli import COMMANDS

    covered = {argv[0] for argv, _ in BAD_INPUT if argv}
    assert set(COMMANDS) <= covered and len(BAD_INPUT) >= 30


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--lr", "nan"],
        ["serve", "--port", "99999"],
        ["fork", "{run}", "--epoch", "0", "--delete-filters", "conv1:{conv1_all}", "--store", "{store}"],
        ["steer", "{run}", "freeze", "conv1", "--store", "{store}"],
    ],
)
def test_the_real_command_exits_2_with_one_line(argv, request, tmp_path):
    """Through a real process: the exit status, and stderr as a user sees it (TensorFlow's logs included)."""
    import os
    import subprocess
    import sys

    argv, _ = _fill(argv, request, tmp_path)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    # `python -m revacnn.cli`, and on the way out: was TensorFlow imported? (it need not be, to refuse)
    script = ("import runpy, sys\nsys.argv[0] = 'revacnn'\ntry:\n"
              "    runpy.run_module('revacnn.cli', run_name='__main__')\nfinally:\n"
              "    print('tensorflow imported:', 'tensorflow' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 2, proc
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout.splitlines()[-1] == "tensorflow imported: False"


def _subparsers():
    import argparse

    from revacnn.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_option_says_what_it_does_and_its_default():
    import argparse

    subs = _subparsers()
    assert set(subs) == {"train", "fork", "resume", "steer", "runs", "sql", "compare", "gc", "serve", "demo"}
    for cmd, sub in subs.items():
        text = sub.format_help()  # expands every %(default)s
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"{cmd} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and len(action.help) > 10, where
            if not action.option_strings:
                continue  # a positional: no default to state
            if action.required:
                assert "required" in action.help, where
                continue
            assert "default" in action.help, where
            if action.default not in (None, False, []):
                assert "%(default)s" in action.help or str(action.default) in action.help, where
                shown = action.help % {"default": action.default}
                # argparse wraps long defaults (paths) anywhere: compare without whitespace
                assert "".join(shown.split()) in "".join(text.split()), where


def test_fork_help_says_epochs_is_the_final_epoch():
    text = " ".join(_subparsers()["fork"].format_help().split())
    assert "the final epoch" in text and "fit(initial_epoch=K, epochs=N)" in text
    assert "--epochs N" in text
