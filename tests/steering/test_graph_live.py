"""Group surgery on the live path: frozen consumers refused, uids of every changed layer, --dry-run."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import revacnn
from revacnn import cli
from revacnn.errors import UnsupportedLayerError
from revacnn.steering import graph, parse, send
from revacnn.trainer.trainer import Trainer, TrainerState

from .test_graph_surgery import resnet_like
from .test_steering import train_with


def test_add_filters_with_a_frozen_consumer_is_rejected_live(tmp_path, keras_mod, tiny_data):
    sched = {
        (1, 0): [parse("freeze", ["conv2"])],
        (1, 1): [parse("add-filters", ["conv1", "2"])],
        (1, 2): [parse("delete-filters", ["conv1", "0"])],
    }
    store, run = train_with(tmp_path, keras_mod, tiny_data, sched, epochs=2)
    assert run.status == "finished"
    ev = run.events()
    by = dict(zip(ev.kind, zip(ev.status, ev.message, strict=True), strict=True))
    status, message = by["add-filters"]
    assert status == "rejected" and "'conv2' is frozen" in message and "dead on arrival" in message
    assert by["delete-filters"][0] == "applied"  # deleting next to a frozen consumer is fine
    assert run.epoch(2).layer("conv1").kernel.shape[0] == 3
    np.testing.assert_array_equal(run.epoch(2).layer("conv1").filter_uids, [1, 2, 3])


def test_swap_remaps_the_uids_of_every_layer_of_the_group(keras_mod):
    model = resnet_like()
    state = TrainerState(uids={"stem": [0, 1, 2, 3], "b1c2": [10, 11, 12, 13], "b1c1": [5, 6, 7, 8]},
                         next_uid={"stem": 4, "b1c2": 14, "b1c1": 9},
                         frozen_filters={"b1c2": [11, 12]})
    stub = SimpleNamespace(state=state, rebuild=lambda carry: None)
    res = graph.apply(model, None, {"op": "delete-filters", "args": {"layer": "stem", "indices": [1]}})
    Trainer.swap(stub, res)
    assert state.uids == {"stem": [0, 2, 3], "b1c2": [10, 12, 13], "b1c1": [5, 6, 7, 8]}
    assert state.frozen_filters == {"b1c2": [12]}
    stub.model = res.model
    res2 = graph.apply(res.model, None, {"op": "add-filters", "args": {"layer": "b1c2", "n": 2}})
    Trainer.swap(stub, res2)
    assert state.uids["stem"] == [0, 2, 3, 4, 5] and state.uids["b1c2"] == [10, 12, 13, 14, 15]
    assert state.next_uid == {"stem": 6, "b1c2": 16, "b1c1": 9}


def test_dry_run_prints_the_plan_and_applies_nothing(tmp_path, keras_mod, tiny_data, capsys):
    store, run = train_with(tmp_path, keras_mod, tiny_data, {}, epochs=1)
    root = str(tmp_path / "store")
    rc = cli.main(["steer", "--store", root, run.run_id, "add-filters", "conv1", "2", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "dry run against epoch 1" in out and "conv1 (Conv2D, producer) out 4->6 new 4-5" in out
    assert "conv2 (Conv2D, consumer) in 4->6 new inputs 4-5" in out
    assert not any(p.suffix == ".json" for p in store.layout.commands_dir(run.run_id).glob("*"))
    n_runs = len(store.runs()) if hasattr(store, "runs") else None
    rc = cli.main(["fork", "--store", root, run.run_id, "--epoch", "1", "--freeze", "dense1",
                   "--delete-filters", "conv2:0,1", "--add-filters", "conv1:1", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "freeze layer=dense1 (no filter surgery)" in out and "delete 0-1" in out
    if n_runs is not None:
        assert len(store.runs()) == n_runs  # no fork was made
    # the frozen consumer is refused in the dry run too: one line, exit 2
    rc = cli.main(["fork", "--store", root, run.run_id, "--epoch", "1", "--freeze", "conv2",
                   "--add-filters", "conv1:1", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "'conv2' is frozen" in err and len(err.strip().splitlines()) == 1


def test_live_group_surgery_on_a_residual_run_then_fork(tmp_path, keras_mod):
    """Needs a trainer that records functional graphs (the functional-models work); skipped before."""
    from revacnn.models import validate_model
    from revacnn.trainer import trainer as trainer_mod
    from revacnn.trainer.fit import fork

    try:
        validate_model(resnet_like("softmax"))
    except UnsupportedLayerError as exc:
        pytest.skip(f"this trainer records chains only: {exc}")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (96, 8, 8, 3), dtype=np.uint8)
    y = rng.integers(0, 3, 96)
    sched = {(1, 0): [parse("add-filters", ["stem", "2"])],
             (1, 1): [parse("delete-filters", ["b2sc", "0"])],
             (2, 0): [parse("reinit-filters", ["b1c1", "1"])]}
    real = trainer_mod.Trainer._between_batches

    def hooked(self, epoch, batch):
        for cmd in sched.get((epoch, batch), []):
            send(self.store, self.run_id, cmd)
        return real(self, epoch, batch)

    store = revacnn.open_store(tmp_path / "store")
    trainer_mod.Trainer._between_batches = hooked
    try:
        run = revacnn.fit(resnet_like("softmax"), (x, y), validation_data=(x[:32], y[:32]), epochs=2,
                          batch_size=32, store=store, probes=4, progress=False, embeddings=False)
    finally:
        trainer_mod.Trainer._between_batches = real
    assert run.status == "finished"
    ev = run.events()
    assert (ev.status == "applied").all(), ev.message.tolist()
    assert "group: stem, b1c2" in ev.message[0]
    rec = run.epoch(2)
    np.testing.assert_array_equal(rec.layer("stem").filter_uids, [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(rec.layer("b1c2").filter_uids, [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(rec.layer("b2c2").filter_uids, [1, 2, 3, 4, 5])
    child = fork(store, run.run_id, 2, changes=[parse("delete-filters", ["b1c2", "0"])], epochs=3,
                 progress=False, data=((x, y), (x[:32], y[:32])))
    assert child.status == "finished"
    np.testing.assert_array_equal(child.epoch(3).layer("stem").filter_uids, [1, 2, 3, 4, 5])
    assert child.load_model(3).get_layer("b1c1").kernel.shape == (3, 3, 5, 4)
