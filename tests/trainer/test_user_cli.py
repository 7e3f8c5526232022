"""`revacnn train --model MODULE:FUNCTION`, the built-in resnet20, and the runtime settings recorded with a run."""

from __future__ import annotations

import numpy as np
import pytest

import revacnn
from revacnn.cli import main
from revacnn.config import TrainConfig
from revacnn.models import build_model, recorded_layers
from revacnn.trainer.fit import check_runtime, runtime_settings


def _cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_train_a_users_factory_from_the_cli(tmp_path, capsys):
    path = tmp_path / "s"
    code, out, err = _cli(["train", "--store", str(path), "--model", "tests.trainer.user_setups:cli_factory",
                           "--epochs", "1", "--train-size", "64", "--val-size", "32", "--probes", "4",
                           "--batch-size", "32", "--quiet", "--no-embeddings"], capsys)
    assert code == 0, err
    run_id = out.splitlines()[0]
    store = revacnn.open_store(path)
    run = store.run(run_id)
    assert run.epochs() == [0, 1]
    assert set(run.epoch(1).conv_layers) == {"c1", "c2"}  # a user's model keeps its own layer names
    assert run.config["model"] == "tests.trainer.user_setups:cli_factory"
    assert set(run.config["runtime"]) == set(runtime_settings())


@pytest.mark.parametrize("spec, fragment", [
    ("no_such_module_xyz:f", "Cannot import the model module"),
    ("tests.trainer.user_setups:nope", "has no function 'nope'"),
])
def test_bad_factory_is_one_line_and_exit_2(tmp_path, capsys, spec, fragment):
    code, out, err = _cli(["train", "--store", str(tmp_path / "s"), "--model", spec, "--epochs", "1",
                           "--train-size", "32", "--val-size", "16", "--quiet"], capsys)
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err


def test_resnet20_is_he_et_al_cifar_resnet20():
    model = build_model("resnet20", (32, 32, 3), 10)
    import keras

    convs = [r for r in recorded_layers(model) if r.kind == "conv"]
    assert [r.name for r in convs] == [f"conv{i}" for i in range(1, 22)]  # 19 convs + 2 projections
    assert 0.26e6 < model.count_params() < 0.28e6
    assert sum(isinstance(layer, keras.layers.Add) for layer in model.layers) == 9
    assert sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers) == 21
    widths = sorted({int(r.layer.filters) for r in convs})
    assert widths == [16, 32, 64]
    assert [r.name for r in convs if r.layer.kernel_size == (1, 1)] == ["conv10", "conv17"]  # projections
    assert model.get_layer("dense1").units == 10
    assert model.output_shape == (None, 10)


def test_a_fork_under_other_thread_settings_says_bit_exactness_is_not_promised(capsys):
    cfg = TrainConfig(runtime={**runtime_settings(), "intra_op_threads": 97})
    msg = check_runtime(cfg, "fork")
    assert msg is not None and "intra_op_threads 97" in msg and "not promised" in msg
    assert "not promised" in capsys.readouterr().err
    assert check_runtime(TrainConfig(runtime=runtime_settings()), "fork") is None
    np.testing.assert_equal(runtime_settings()["cpu_count"] > 0, True)
