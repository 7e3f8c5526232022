"""Surgery and freeze latency on a CIFAR ResNet-20: in-process apply, re-trace and first step; the live steer round trip."""

from __future__ import annotations

import argparse
import dataclasses
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
    """graph.apply (plan, rebuild, weight copy, optimizer transfer), then the trainer's own train step
    (`revacnn.trainer.step`) traced afresh: its Python trace and its first call (graph optimisation,
    instantiation, one step) timed apart. Freeze rows: a new frozen set, and back to a traced one (cached)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from revacnn.models.graph import recorded_layers
    from revacnn.steering import graph
    from revacnn.trainer.step import LayerSpec, StepCache

    keras.utils.set_random_seed(0)
    model, source = _model()
    opt = keras.optimizers.Adam(1e-3)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy())
    opt.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.integers(0, 255, (batch, 32, 32, 3)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, batch))
    idx = tf.range(batch, dtype=tf.int32)

    def make_step(m, o, cache=None, frozen=()):
        """(trace_s, first_call_s) of the trainer's step for ``m``; the step itself."""
        if not getattr(m, "compiled", False) or m.optimizer is not o:
            m.compile(optimizer=o, loss=keras.losses.SparseCategoricalCrossentropy())
        specs = [LayerSpec(r, r.name in frozen, None) for r in recorded_layers(m)]
        cache = cache or StepCache()
        t0 = time.perf_counter()
        traced, hit = cache.steps(m, o, specs, x_all=x, y_all=y)
        if not hit:
            traced.step_idx.get_concrete_function()  # the Python trace alone
        t1 = time.perf_counter()
        float(traced.step_idx(idx))
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, traced.step_idx

    base_trace, base_first, step = make_step(model, opt)
    for _ in range(2):
        step(idx)
    base_step = []
    for _ in range(5):
        t = time.perf_counter()
        float(step(idx))
        base_step.append(time.perf_counter() - t)
    ops = [
        ("add-filters", {"layer": "s1b1_conv2", "n": 2}),       # the stage-1 residual group
        ("delete-filters", {"layer": "s2b1_proj", "indices": [0, 5]}),  # stage-2 group
        ("add-filters", {"layer": "s3b2_conv1", "n": 4}),       # a block-internal layer
        ("reinit-filters", {"layer": "s1b2_conv1", "indices": [1, 2]}),
    ]
    if source.startswith("revacnn"):  # the built-in model names its convs conv1..conv21
        ops = [("add-filters", {"layer": "conv3", "n": 2}), ("delete-filters", {"layer": "conv10", "indices": [0, 5]}),
               ("add-filters", {"layer": "conv18", "n": 4}), ("reinit-filters", {"layer": "conv4", "indices": [1, 2]})]
    cache = StepCache()
    make_step(model, opt, cache)  # the unfrozen step, traced: what reinit (in place) reuses
    rows = []
    for op, args in ops:
        apply_s, trace_s, first_s, plan_s = [], [], [], []
        group = changed = None
        for i in range(samples):
            a = dict(args)  # every sample starts from the same (original) model
            t0 = time.perf_counter()
            p = graph.plan(model, {"op": op, "args": a})
            t1 = time.perf_counter()
            res = graph.apply(model, opt, {"op": op, "args": a}, seed=i)
            t2 = time.perf_counter()
            same = res.model is model
            tr, first, _ = make_step(res.model if not same else model, res.optimizer if not same else opt,
                                     cache if same else None)
            plan_s.append(t1 - t0)
            apply_s.append(t2 - t1)
            trace_s.append(tr)
            first_s.append(first)
            group, changed = p.group, len(p.changes)
            del res
        # the background path (revacnn.trainer.steer.PreparedSurgery): the new model is built, traced and
        # warmed off the training thread; the training thread then pays only the swap: the surgery again
        # from that batch's values, moving them into the prepared variables, and the first (warm) step
        swap_s = []
        if op != "reinit-filters":
            for i in range(samples):
                a = dict(args)
                pre = graph.apply(model, opt, {"op": op, "args": a}, seed=i)
                _, _, pstep = make_step(pre.model, pre.optimizer)  # traced and called once (warm)
                t0 = time.perf_counter()
                fresh = graph.apply(model, opt, {"op": op, "args": a}, seed=i)
                for dst, src in zip(pre.model.variables + pre.optimizer.variables,
                                    fresh.model.variables + fresh.optimizer.variables, strict=True):
                    dst.assign(src.value)
                float(pstep(idx))
                swap_s.append(time.perf_counter() - t0)
                del pre, fresh
        tot = [a + b + c for a, b, c in zip(apply_s, trace_s, first_s, strict=True)]
        rows.append({
            "op": f"{op} {args['layer']}", "group": len(group), "layers_changed": changed,
            "plan_ms": 1e3 * median(plan_s), "apply_ms": 1e3 * median(apply_s),
            "apply_min_ms": 1e3 * min(apply_s), "apply_max_ms": 1e3 * max(apply_s),
            "trace_ms": 1e3 * median(trace_s), "first_call_ms": 1e3 * median(first_s),
            "total_ms": 1e3 * median(tot), "total_min_ms": 1e3 * min(tot), "total_max_ms": 1e3 * max(tot),
            "swap_ms": 1e3 * median(swap_s) if swap_s else float("nan"),
            "swap_min_ms": 1e3 * min(swap_s) if swap_s else float("nan"),
            "swap_max_ms": 1e3 * max(swap_s) if swap_s else float("nan"),
            "samples": samples,
        })
    stage1 = [f"conv{i}" for i in range(1, 8)] if source.startswith("revacnn") else []
    if stage1:  # freeze: same variables, a new frozen set; then back to the sets already traced
        fz_new, fz_back = [], []
        for _ in range(samples):
            c = StepCache()
            make_step(model, opt, c)
            tr, first, _ = make_step(model, opt, c, frozen=stage1)
            fz_new.append(tr + first)
            tr, first, _ = make_step(model, opt, c)  # unfreeze back: cached
            fz_back.append(tr + first)
        rows.append({"op": "freeze conv1..conv7 (a new frozen set)", "total_ms": 1e3 * median(fz_new),
                     "total_min_ms": 1e3 * min(fz_new), "total_max_ms": 1e3 * max(fz_new), "samples": samples})
        rows.append({"op": "unfreeze back (a frozen set traced before: cached)", "total_ms": 1e3 * median(fz_back),
                     "total_min_ms": 1e3 * min(fz_back), "total_max_ms": 1e3 * max(fz_back), "samples": samples})
    rows.append({"op": f"(no surgery: first trace, {source}, batch {batch})", "trace_ms": 1e3 * base_trace,
                 "first_call_ms": 1e3 * base_first, "total_ms": 1e3 * (base_trace + base_first), "samples": 1})
    rows.append({"op": "(no surgery: traced step)", "first_call_ms": 1e3 * median(base_step),
                 "samples": len(base_step)})
    return rows


def round_trip(samples: int, background: bool = True) -> dict:
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
    if source.startswith("revacnn"):  # the built-in model: conv3 is s1b1_conv2
        ops = [("add-filters", ["conv3", "1"]), ("delete-filters", ["conv3", "0"])]
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
        ds = dataclasses.replace(ds, x_train=rng.integers(0, 255, (3000, *shape), dtype=np.uint8),
                                 x_val=rng.integers(0, 255, (300, *shape), dtype=np.uint8))
    cfg = TrainConfig(epochs=40, train_size=len(ds.y_train), val_size=300, embeddings=False)
    opt = keras.optimizers.Adam(1e-3)
    opt.build(model.trainable_variables)
    pidx = select_probes(ds.y_val, 8)
    sid = create_session(store, dataset=dataset, model=model.name, probe_images=ds.x_val[pidx],
                         probe_labels=ds.y_val[pidx], probe_indices=pidx, class_names=ds.class_names, config={})
    writer = RunWriter.create(store, session_id=sid, config=cfg.to_dict(), name="surgery-latency")
    trainer = Trainer(model=model, optimizer=opt, loss_fn=keras.losses.SparseCategoricalCrossentropy(),
                      data=TrainData.arrays(ds.x_train, ds.y_train, ds.x_val, ds.y_val), probe_images=ds.x_val[pidx],
                      probe_labels=ds.y_val[pidx], writer=writer, config=cfg, progress=False)
    trainer.background_surgery = background
    trained_at: dict[str, float] = {}
    current: list[str | None] = [None]
    real_swap = trainer.swap

    def swap(result):  # time the first step of the new model (it includes the re-trace)
        real_swap(result)
        step = trainer._step_idx  # array data: the trainer steps by indices

        def timed(idx):
            out = step(idx)
            float(out)
            if current[0] and current[0] not in trained_at:
                trained_at[current[0]] = time.time()
            trainer._step_idx = step
            return out

        trainer._step_idx = timed

    trainer.swap = swap
    ticks: list[float] = []  # wall clock of every batch boundary: the longest gap is the training stall
    real_between = trainer._between_batches

    def between(epoch, batch):
        ticks.append(time.time())
        return real_between(epoch, batch)

    trainer._between_batches = between
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

    def stall(e: str) -> float:  # the longest gap between two batch boundaries from send to trained
        t = [x for x in ticks if sent[e] <= x <= trained_at[e] + 5.0]
        t = [sent[e]] + t
        return 1e3 * max((b - a for a, b in zip(t, t[1:], strict=False)), default=float("nan"))

    stalls = [stall(e) for e in ev.event_id if e in trained_at]
    steady = [1e3 * (b - a) for a, b in zip(ticks, ticks[1:], strict=False)]
    return {
        "model": source, "commands": len(ev), "applied": int((ev.status == "applied").sum()),
        "sent_to_applied_ms": median(applied_ms), "sent_to_applied_max_ms": max(applied_ms, default=float("nan")),
        "sent_to_training_ms": median(total), "sent_to_training_max_ms": max(total, default=float("nan")),
        "spread_ms": statistics.pstdev(total) if len(total) > 1 else float("nan"),
        "stall_ms": median(stalls), "stall_min_ms": min(stalls, default=float("nan")),
        "stall_max_ms": max(stalls, default=float("nan")), "median_batch_gap_ms": median(steady),
        "background": bool(trainer.background_surgery),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--no-round-trip", action="store_true")
    p.add_argument("--no-in-process", action="store_true")
    p.add_argument("--sync", action="store_true", help="live round trip with background surgery off")
    args = p.parse_args(argv)
    rows = [] if args.no_in_process else in_process(args.samples)
    print(table(rows, ["op", "group", "layers_changed", "plan_ms", "apply_ms", "apply_min_ms", "apply_max_ms",
                       "trace_ms", "first_call_ms", "total_ms", "total_min_ms", "total_max_ms", "swap_ms",
                       "swap_min_ms", "swap_max_ms", "samples"]))
    out: dict = {"in_process": rows}
    if not args.no_round_trip:
        rt = round_trip(args.samples, background=not args.sync)
        print(table([rt]))
        out["round_trip"] = rt
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
