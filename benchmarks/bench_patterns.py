"""The paper's two scenarios as measures: a healthy run vs degraded ones (too-high learning rate, colour dropped)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table  # noqa: E402

QUERY = """
SELECT r.name,
       max(e.val_accuracy) FILTER (WHERE e.epoch = (SELECT max(epoch) FROM epochs WHERE run_id = r.run_id))
           AS final_val_acc,
       avg(l.cluster_score) FILTER (WHERE l.kind = 'conv' AND l.epoch = (SELECT max(epoch) FROM epochs WHERE run_id = r.run_id))
           AS cluster_score,
       max(l.rgb_mono_fraction) FILTER (WHERE l.layer = 'conv1' AND l.epoch = (SELECT max(epoch) FROM epochs WHERE run_id = r.run_id))
           AS rgb_mono_fraction
FROM runs r JOIN epochs e USING (run_id) JOIN layers l ON l.run_id = r.run_id AND l.epoch = e.epoch
GROUP BY r.name, r.run_id, r.created_at ORDER BY r.created_at
"""


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--high-lr", type=float, default=0.03)
    args = p.parse_args(argv)

    import keras

    import revacnn
    from revacnn.config import TrainConfig
    from revacnn.data import load_dataset
    from revacnn.models import build_model
    from revacnn.trainer import train

    store = revacnn.open_store(Path(tempfile.mkdtemp(prefix="revacnn-patterns-")) / "store")
    base = TrainConfig(epochs=args.epochs, train_size=args.train_size, val_size=1000, seed=0)
    train(base.replace(name="healthy"), store, progress=False)
    train(base.replace(name=f"lr={args.high_lr:g}", lr=args.high_lr), store, progress=False)
    # colour dropped by the input pipeline: only the red channel reaches the network
    ds = load_dataset("shapes", train_size=args.train_size, val_size=1000, seed=0)
    x, xv = ds.x_train.copy(), ds.x_val.copy()
    x[..., 1:] = 0
    xv[..., 1:] = 0
    keras.utils.set_random_seed(0)
    model = build_model("convnetjs", ds.input_shape, ds.num_classes)
    revacnn.fit(model, (x, ds.y_train), validation_data=(xv, ds.y_val), epochs=args.epochs, store=store,
                name="colour dropped", progress=False, class_names=ds.class_names)
    res = store.sql(QUERY)
    rows = res.to_dict("records")
    print("SQL:\n" + QUERY.strip())
    print(table(rows))
    print(json.dumps(rows, default=float))
    return {"rows": rows}


if __name__ == "__main__":
    main()
