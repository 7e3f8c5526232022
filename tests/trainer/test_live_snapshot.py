"""Live snapshots keep up with the recorded epochs, however short the epochs are."""

from __future__ import annotations

import revacnn
from revacnn.config import TrainConfig
from revacnn.storage.live import read_live_snapshot
from revacnn.trainer import train


def test_snapshot_at_every_epoch_end_even_when_epochs_are_shorter_than_the_period(tmp_path):
    store = revacnn.open_store(tmp_path / "store")
    # A period far longer than the whole run: only the end-of-epoch snapshots can be there.
    cfg = TrainConfig(epochs=3, train_size=128, val_size=64, probes=4, batch_size=64,
                      embeddings=False, live_every_s=3600.0)
    run = train(cfg, store, progress=False)
    snap = read_live_snapshot(store, run.run_id)
    assert snap is not None, "no live snapshot was written"
    meta = snap["meta"]
    assert (meta["epoch"], meta["batch"], meta["n_batches"]) == (3, 2, 2)
    assert max(run.epochs()) == meta["epoch"]
    # the batch curve holds one point per epoch end, in order
    assert [int(e) for e in snap["batches"][:, 0]] == [1, 2, 3]
