"""The `revacnn` command: bad input gives one line on stderr and exit code 2; queries print rows."""

from __future__ import annotations

import json

import pytest

from revacnn.cli import main


def run_cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--dataset", "imagenet"], "invalid choice: 'imagenet'"),
        (["train", "--model", "resnet"], "invalid choice: 'resnet'"),
        (["train", "--epochs", "-1"], "expected an integer >= 0"),
        (["train", "--epochs", "two"], "expected an integer"),
        (["sql", "SELECT 1", "--store", "/nonexistent/store"], "No revacnn store"),
        (["runs", "--store", "/nonexistent/store"], "No revacnn store"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, fragment, capsys):
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith("usage:")]
    assert len(lines) == 1, err
    assert fragment in lines[0]
    assert "Traceback" not in err


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
    code, out, _ = run_cli(["steer", rid, "freeze", "conv1", "--store", str(cli_store)], capsys)
    assert code == 1 and "not running" in out  # a finished run cannot be steered
    code, _, err = run_cli(["steer", rid, "explode", "--store", str(cli_store)], capsys)
    assert code == 2 and "Unknown steering op" in err
    code, _, err = run_cli(["fork", rid, "--epoch", "7", "--store", str(cli_store)], capsys)
    assert code == 2 and "no committed epoch 7" in err
    code, _, err = run_cli(["fork", "run-nope", "--epoch", "0", "--store", str(cli_store)], capsys)
    assert code == 2 and "run-nope" in err
