"""Deterministic user setups shared by the replay tests and their SIGKILL subprocess (python -m tests.trainer.user_setups)."""

from __future__ import annotations

import sys
import time

import numpy as np

SEED = 21
EPOCHS = 4
BATCH = 32


def data(n_train: int = 112, n_val: int = 32, classes: int = 4):
    """Standardized float images (8x8x3): class = dominant channel / brightness band; one-hot labels."""
    rng = np.random.default_rng(SEED)

    def make(n):
        y = rng.integers(0, classes, n)
        x = rng.normal(0, 1, (n, 8, 8, 3)).astype(np.float32)
        for c in range(3):
            x[y == c, :, :, c] += 1.5
        x[y == 3] -= 1.0
        return x, np.eye(classes, dtype=np.float32)[y]

    return make(n_train), make(n_val)


def build(kind: str):
    """(model, (x, y), (x_val, y_val)) for ``kind``: ``adamw`` or ``resnet20``; seeded before building."""
    import keras

    from revacnn.models import resnet20

    keras.utils.set_random_seed(SEED)
    (x, y), (xv, yv) = data()
    L = keras.layers
    if kind == "adamw":
        inp = keras.Input((8, 8, 3))
        h = L.Conv2D(8, 3, padding="same", name="conv1")(inp)
        h = L.ReLU(name="relu1")(L.BatchNormalization(name="bn1")(h))
        r = L.Conv2D(8, 3, padding="same", name="conv2")(h)
        h = L.ReLU(name="relu2")(L.Add(name="add")([h, L.BatchNormalization(name="bn2")(r)]))
        h = L.Dropout(0.25, name="drop")(L.GlobalAveragePooling2D(name="gap")(h))
        model = keras.Model(inp, L.Dense(4, name="dense1")(h), name="adamw_net")  # logits
        sched = keras.optimizers.schedules.CosineDecay(1e-2, decay_steps=12)
        model.compile(optimizer=keras.optimizers.AdamW(learning_rate=sched, weight_decay=0.05),
                      loss=keras.losses.CategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    elif kind == "resnet20":
        model = resnet20((8, 8, 3), 4, dropout=0.3, rescale=False)
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
                      loss="categorical_crossentropy", metrics=["accuracy"])
    else:
        raise ValueError(kind)
    return model, (x, y), (xv, yv)


class HangAfter:
    """A Keras callback that blocks forever after recorded epoch ``epoch`` (so a test can SIGKILL it there)."""

    def __new__(cls, epoch: int):
        import keras

        class _Hang(keras.callbacks.Callback):
            def on_epoch_end(self, e, logs=None):
                if e + 1 == epoch:
                    while True:
                        time.sleep(1)

        return _Hang()


def main(argv: list[str]) -> None:
    store, kind, hang = argv[0], argv[1], int(argv[2])
    import revacnn

    model, train, val = build(kind)
    run = revacnn.fit(model, train, validation_data=val, epochs=EPOCHS, batch_size=BATCH, store=store, probes=4,
                      seed=SEED, name=kind, progress=False, embeddings=False, callbacks=[HangAfter(hang)])
    print(run.run_id, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])


def cli_factory(input_shape, num_classes):
    """A user's model factory for ``revacnn train --model tests.trainer.user_setups:cli_factory``."""
    import keras

    L = keras.layers
    inp = keras.Input(input_shape)
    h = L.Rescaling(1.0 / 255.0, name="scale")(inp)
    h = L.Conv2D(4, 3, padding="same", activation="relu", name="c1")(h)
    b = L.Conv2D(4, 3, padding="same", name="c2")(h)
    h = L.Add(name="res")([h, b])
    out = L.Dense(num_classes, activation="softmax", name="out")(L.GlobalAveragePooling2D()(h))
    return keras.Model(inp, out, name="cli_net")
