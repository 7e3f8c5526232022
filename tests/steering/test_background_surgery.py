"""Live add/delete-filters prepared in a background thread: swapped at a later batch, equal to a surgery there."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

import revacnn
from revacnn.steering import graph, parse, send
from revacnn.trainer import trainer as trainer_mod

from ..conftest import tiny_cnn


def _train(tmp_path, keras, tiny_data, cmd, *, epochs: int = 2):
    """Train the tiny CNN (BatchNorm) with ``cmd`` sent before batch 1 of epoch 1; the background
    preparation is held until the old model has trained 3 more batches. Returns what was seen."""
    Trainer = trainer_mod.Trainer
    real_between, real_prepare, real_adopt = Trainer._between_batches, Trainer.prepare_swap, Trainer.adopt
    gate = threading.Event()
    seen: dict = {"adopted": 0}

    def prepare(self, command, frozen):
        out = real_prepare(self, command, frozen)
        assert gate.wait(300), "the trainer never reached the batch that releases the preparation"
        return out

    def adopt(self, prepared, cache, fresh):
        seen["adopted"] += 1
        seen["prepared_step"] = next(iter(cache._steps.values())).step_idx
        return real_adopt(self, prepared, cache, fresh)

    def between(self, epoch, batch):
        if (epoch, batch) == (1, 1):
            send(self.store, self.run_id, cmd)
        job = self.__dict__.get("_surgery_job")
        before = None
        if job is not None:
            taken = seen.setdefault("taken", (epoch, batch, int(self.optimizer.iterations.numpy())))
            if (epoch, batch) >= (taken[0], taken[1] + 4):  # released after taken + 3: wait for it here
                assert job.done.wait(300), "the background preparation never finished"
                before = (self.model, self.optimizer)
        real_between(self, epoch, batch)
        if job is not None and (epoch, batch) == (seen["taken"][0], seen["taken"][1] + 3):
            gate.set()
        if before is not None and self.model is not before[0]:
            # the old model and optimizer as they were at the swap: nothing trains them any more
            seen["swap"] = (epoch, batch, *before, self.model, self.optimizer, self._step_idx)
            seen["values"] = ([v.numpy().copy() for v in self.model.variables],
                              [np.asarray(v).copy() for v in self.optimizer.variables])

    keras.utils.set_random_seed(0)
    (x, y), (xv, yv) = tiny_data
    Trainer._between_batches, Trainer.prepare_swap, Trainer.adopt = between, prepare, adopt
    Trainer.background_surgery = True  # opt-in
    try:
        run = revacnn.fit(tiny_cnn(keras, bn=True), (x, y), validation_data=(xv, yv), epochs=epochs, batch_size=8,
                          store=revacnn.open_store(tmp_path / "store"), probes=4, progress=False,
                          embeddings=False, seed=0)
    finally:
        Trainer._between_batches, Trainer.prepare_swap, Trainer.adopt = real_between, real_prepare, real_adopt
        Trainer.background_surgery = False
    return run, seen


@pytest.mark.parametrize("words", [["add-filters", "conv1", "2"], ["delete-filters", "conv2", "1", "3"]])
def test_background_surgery_equals_the_surgery_at_the_swap_batch(tmp_path, keras_mod, tiny_data, words):
    import tensorflow as tf

    cmd = parse(words[0], words[1:], **({"init": "random"} if words[0] == "add-filters" else {}))
    run, seen = _train(tmp_path, keras_mod, tiny_data, cmd)
    assert run.status == "finished", run.status_info
    assert seen["adopted"] == 1  # the prepared model was used
    epoch, batch, old_model, old_opt, new_model, new_opt, step_idx = seen["swap"]
    assert step_idx is seen["prepared_step"]  # with the step traced in the background: no re-trace
    t_epoch, t_batch, t_iters = seen["taken"]
    # the old model kept training while the new one was prepared; the swap came at the next boundary
    assert (epoch, batch) == (t_epoch, t_batch + 4)
    assert int(old_opt.iterations.numpy()) > t_iters
    ev = run.events().set_index("event_id").loc[cmd.command_id]
    assert ev["status"] == "applied", ev["message"]
    assert (int(ev["epoch"]), int(ev["batch"])) == (epoch, batch)  # the event names the swap batch
    assert json.loads(ev["args"])["touched"] == graph.plan(old_model, cmd).layers
    # the reference: the same surgery, done by hand on the old model as it was at that batch
    seed = 0 + int(old_opt.iterations.numpy()) if words[0] == "add-filters" else None
    ref = graph.apply(old_model, old_opt, cmd, seed=seed)
    weights, slots = seen["values"]  # the new model and optimizer right after the swap
    assert len(weights) == len(ref.model.variables) and len(slots) == len(ref.optimizer.variables)
    for got, want in zip(weights, ref.model.variables, strict=True):
        np.testing.assert_array_equal(got, want.numpy(), err_msg=want.path)
    for got, want in zip(slots, ref.optimizer.variables, strict=True):
        np.testing.assert_array_equal(got, np.asarray(want), err_msg=want.path)
    # the values are those of the swap batch, not of the batch the command was taken at
    it = [np.asarray(v) for v, w in zip(slots, ref.optimizer.variables, strict=True) if "iteration" in w.path]
    assert [int(i) for i in it] == [int(old_opt.iterations.numpy())] and int(it[0]) > t_iters
    # the new model trained on after the swap; its record at the epoch's end has the new shape
    n = {"add-filters": 6, "delete-filters": 4}[words[0]]
    layer = words[1]
    assert run.epoch(epoch).layer(layer).kernel.shape[0] == n
    if words[0] == "add-filters":
        np.testing.assert_array_equal(run.epoch(epoch).layer(layer).filter_uids, [0, 1, 2, 3, 4, 5])
    else:
        np.testing.assert_array_equal(run.epoch(epoch).layer(layer).filter_uids, [0, 2, 4, 5])
    xb = tf.constant(tiny_data[0][0][:8].astype("float32"))
    if words[0] == "add-filters":  # init=random: the new filters' outgoing weights are drawn, not zero
        assert not np.allclose(ref.model(xb, training=False).numpy(), old_model(xb, training=False).numpy())


def test_background_swap_values_equal_a_synchronous_surgery(keras_mod, tiny_data):
    """`Trainer.adopt` gives the prepared model the values of the surgery at the swap, exactly:
    every weight, BatchNorm statistic and optimizer slot, and the same outputs."""
    import tensorflow as tf

    from revacnn.trainer.step import StepCache

    keras = keras_mod
    keras.utils.set_random_seed(0)
    (x, y), _ = tiny_data
    model = tiny_cnn(keras, bn=True)
    opt = keras.optimizers.Adam(1e-2)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.fit(x[:64].astype("float32"), y[:64], epochs=1, batch_size=16, verbose=0)
    cmd = {"op": "add-filters", "args": {"layer": "conv2", "n": 3, "init": "random"}}
    prepared = graph.apply(model, opt, cmd, seed=1)  # values from before more training
    prepared.model.compile(optimizer=prepared.optimizer, loss="sparse_categorical_crossentropy")
    prepared.model.fit(x[:16].astype("float32"), y[:16], epochs=1, verbose=0)  # the warm-up moved them
    model.fit(x[64:128].astype("float32"), y[64:128], epochs=1, batch_size=16, verbose=0)  # the old one trains on
    fresh = graph.apply(model, opt, cmd, seed=7)
    ref = graph.apply(model, opt, cmd, seed=7)  # the synchronous surgery at the swap

    swapped = []
    stub = type("T", (), {})()
    stub.swap = lambda res: swapped.append(res)
    trainer_mod.Trainer.adopt(stub, prepared, StepCache(), fresh)
    (res,) = swapped
    assert res.model is prepared.model and res.optimizer is prepared.optimizer
    for got, want in zip(res.model.get_weights(), ref.model.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(res.optimizer.variables, ref.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    xb = tf.constant(x[:8].astype("float32"))
    np.testing.assert_array_equal(res.model(xb, training=False).numpy(), ref.model(xb, training=False).numpy())
    assert {k: v.tolist() for k, v in res.changed.items()} == {k: v.tolist() for k, v in ref.changed.items()}


def test_background_off_applies_at_the_batch_taken(tmp_path, keras_mod, tiny_data, monkeypatch):
    from .test_steering import train_with

    monkeypatch.setattr(trainer_mod.Trainer, "background_surgery", False)
    cmd = parse("add-filters", ["conv1", "2"])
    _, run = train_with(tmp_path, keras_mod, tiny_data, {(1, 1): [cmd]}, epochs=1, batch_size=8)
    ev = run.events().set_index("event_id").loc[cmd.command_id]
    assert ev["status"] == "applied" and (int(ev["epoch"]), int(ev["batch"])) == (1, 1)
