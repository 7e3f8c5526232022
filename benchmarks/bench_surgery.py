"""Group filter surgery latency on a CIFAR ResNet-20: in-process apply + first step, and the live steer round trip."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, table  # noqa: E402


def resnet20(input_shape=(32, 32, 3), num_classes: int = 10):
    """The CIFAR ResNet-20 of He et al. (2016): 3 stages x 3 basic blocks, 16/32/64 filters,
    BatchNorm, 1x1 projection shortcuts where the shape changes, global average pooling."""
    import keras

    L = keras.layers

    def conv_bn(x, f, name, strides=1, k=3):
        x = L.Conv2D(f, k, strides=strides, padding="same", use_bias=False, name=name)(x)
        return L.BatchNormalization(name=name + "_bn")(x)

    inp = keras.Input(input_shape)
    x = L.ReLU(name="stem_relu")(conv_bn(inp, 16, "stem"))
    for s, f in enumerate((16, 32, 64), start=1):
        for b in range(1, 4):
            strides = 2 if (s > 1 and b == 1) else 1
            p = f"s{s}b{b}"
            y = L.ReLU(name=p + "_relu1")(conv_bn(x, f, p + "_conv1", strides))
            y = conv_bn(y, f, p + "_conv2")
            sc = conv_bn(x, f, p + "_proj", strides, k=1) if strides != 1 or x.shape[-1] != f else x
            x = L.ReLU(name=p + "_out")(L.Add(name=p + "_add")([sc, y]))
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, L.Dense(num_classes, activation="softmax", name="head")(x), name="resnet20")


def _model():
    try:  # the built-in one, where this branch has it
        from revacnn.models import build_model

        return build_model("resnet20", (32, 32, 3), 10), "revacnn.models resnet20"
    except Exception:
        return resnet20(), "bench builder"


def in_process(samples: int, batch: int = 64) -> list[dict]:
    """graph.apply (plan, rebuild, weight copy, optimizer transfer), then a freshly traced train step."""
    import keras
    import numpy as np
    import tensorflow as tf

    from revacnn.steering import graph

    keras.utils.set_random_seed(0)
    model, source = _model()
    opt = keras.optimizers.Adam(1e-3)
    opt.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch, 32, 32, 3)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, batch))
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    def make_step(m, o):
        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = loss_fn(y, m(x, training=True))
            g = tape.gradient(loss, m.trainable_variables)
            o.apply(g, m.trainable_variables)
            return loss

        return step

    step = make_step(model, opt)
    t = time.perf_counter()
    float(step())  # the first call traces: what any re-trace (freeze, surgery) costs
    base_trace = time.perf_counter() - t
    for _ in range(2):
        step()
    base_step = []
    for _ in range(5):
        t = time.perf_counter()
        float(step())
        base_step.append(time.perf_counter() - t)
    ops = [
        ("add-filters", {"layer": "s1b1_conv2", "n": 2}),       # the stage-1 residual group
        ("delete-filters", {"layer": "s2b1_proj", "indices": [0, 5]}),  # stage-2 group
        ("add-filters", {"layer": "s3b2_conv1", "n": 4}),       # a block-internal layer
        ("reinit-filters", {"layer": "s1b2_conv1", "indices": [1, 2]}),
    ]
    rows = []
    for op, args in ops:
        apply_s, first_s, plan_s = [], [], []
        group = changed = None
        for i in range(samples):
            a = dict(args)  # every sample starts from the same (original) model
            t0 = time.perf_counter()
            p = graph.plan(model, {"op": op, "args": a})
            t1 = time.perf_counter()
            res = graph.apply(model, opt, {"op": op, "args": a}, seed=i)
            t2 = time.perf_counter()
            new_step = make_step(res.model, res.optimizer) if res.model is not model else step
            float(new_step())
            t3 = time.perf_counter()
            plan_s.append(t1 - t0)
            apply_s.append(t2 - t1)
            first_s.append(t3 - t2)
            group, changed = p.group, len(p.changes)
            del res
        rows.append({
            "op": f"{op} {args['layer']}", "group": len(group), "layers_changed": changed,
            "plan_ms": 1e3 * median(plan_s), "apply_ms": 1e3 * median(apply_s),
            "apply_min_ms": 1e3 * min(apply_s), "apply_max_ms": 1e3 * max(apply_s),
            "first_step_ms": 1e3 * median(first_s),
            "total_ms": 1e3 * median(a + b for a, b in zip(apply_s, first_s, strict=True)),
            "total_max_ms": 1e3 * max(a + b for a, b in zip(apply_s, first_s, strict=True)),
            "samples": samples,
        })
    rows.append({"op": f"(no surgery: first call incl. trace, {source}, batch {batch})",
                 "first_step_ms": 1e3 * base_trace, "samples": 1, "group": "", "layers_changed": ""})
    rows.append({"op": "(no surgery: traced step)", "first_step_ms": 1e3 * median(base_step),
                 "samples": len(base_step), "group": "", "layers_changed": ""})
    return rows


def round_trip(samples: int) -> dict:
    """Commands sent from another thread to a live Trainer: sent -> applied -> first step trained."""
    import keras

    from revacnn.config import TrainConfig
    from revacnn.data import load_dataset, select_probes
    from revacnn.models import build_model, validate_model
    from revacnn.steering import parse, send
    from revacnn.storage import RunWriter, create_session, open_store
    from revacnn.trainer.trainer import TrainData, Trainer

    store = open_store(Path(tempfile.mkdtemp(prefix="revacnn-surgery-")) / "store")
    model, source = _model()
    ops = [("add-filters", ["s1b1_conv2", "1"]), ("delete-filters", ["s1b1_conv2", "0"])]
    try:
        validate_model(model)
        shape = (32, 32, 3)
        dataset = "cifar-shaped random"
    except Exception as exc:  # this branch's trainer records chains only
        note = f"resnet20 not trainable by this branch's trainer ({type(exc).__name__}); convnetjs used"
        model, source = None, note
        dataset = "shapes"
        ops = [("add-filters", ["conv2", "1"]), ("delete-filters", ["conv2", "0"])]
    ds = load_dataset("shapes", train_size=3000, val_size=300, seed=0)
    if model is None:
        keras.utils.set_random_seed(0)
        model = build_model("convnetjs", ds.input_shape, ds.num_classes)
    else:
        import numpy as np

        rng = np.random.default_rng(0)
        ds.x_train = rng.integers(0, 255, (3000, *shape), dtype=np.uint8)
        ds.x_val = rng.integers(0, 255, (300, *shape), dtype=np.uint8)
    cfg = TrainConfig(epochs=40, train_size=len(ds.y_train), val_size=300, embeddings=False)
    opt = keras.optimizers.Adam(1e-3)
    opt.build(model.trainable_variables)
    pidx = select_probes(ds.y_val, 8)
    sid = create_session(store, dataset=dataset, model=model.name, probe_images=ds.x_val[pidx],
                         probe_labels=ds.y_val[pidx], probe_indices=pidx, class_names=ds.class_names, config={})
    writer = RunWriter.create(store, session_id=sid, config=cfg.to_dict(), name="surgery-latency")
    trainer = Trainer(model=model, optimizer=opt, loss_fn=keras.losses.SparseCategoricalCrossentropy(),
                      data=TrainData(ds.x_train, ds.y_train, ds.x_val, ds.y_val), probe_images=ds.x_val[pidx],
                      probe_labels=ds.y_val[pidx], writer=writer, config=cfg, progress=False)
    trained_at: dict[str, float] = {}
    current: list[str | None] = [None]
    real_swap = trainer.swap

    def swap(result):  # time the first step of the new model (it includes the re-trace)
        real_swap(result)
        step = trainer._step

        def timed(idx):
            out = step(idx)
            float(out)
            if current[0] and current[0] not in trained_at:
                trained_at[current[0]] = time.time()
            trainer._step = step
            return out

        trainer._step = timed

    trainer.swap = swap
    sent: dict[str, float] = {}
    done = threading.Event()

    def sender() -> None:
        while getattr(trainer, "epoch_in_progress", 0) < 1:
            time.sleep(0.05)
        time.sleep(1.0)
        for i in range(samples * 2):
            op, words = ops[i % 2]
            cmd = parse(op, words)
            current[0] = cmd.command_id
            sent[cmd.command_id] = time.time()
            send(store, writer.run_id, cmd)
            deadline = time.time() + 60
            while cmd.command_id not in trained_at and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(0.3)
        trainer.stop_requested = True
        done.set()

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    trainer.run(start_epoch=0, epochs=cfg.epochs)
    t.join(10)
    ev = store.run(writer.run_id).events()
    ev = ev[ev.event_id.isin(list(sent))]
    applied_ms = ev.latency_ms.tolist()
    total = [1e3 * (trained_at[e] - sent[e]) for e in ev.event_id if e in trained_at]
    return {
        "model": source, "commands": len(ev), "applied": int((ev.status == "applied").sum()),
        "sent_to_applied_ms": median(applied_ms), "sent_to_applied_max_ms": max(applied_ms, default=float("nan")),
        "sent_to_training_ms": median(total), "sent_to_training_max_ms": max(total, default=float("nan")),
        "spread_ms": statistics.pstdev(total) if len(total) > 1 else float("nan"),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--no-round-trip", action="store_true")
    args = p.parse_args(argv)
    rows = in_process(args.samples)
    print(table(rows, ["op", "group", "layers_changed", "plan_ms", "apply_ms", "apply_min_ms", "apply_max_ms",
                       "first_step_ms", "total_ms", "total_max_ms", "samples"]))
    out: dict = {"in_process": rows}
    if not args.no_round_trip:
        rt = round_trip(args.samples)
        print(table([rt]))
        out["round_trip"] = rt
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
