"""Filter analytics on plain arrays: pattern measures (cluster, RGB), the filter doctor and stable t-SNE embeddings.

No TensorFlow or Keras here (numpy, scipy, openTSNE only): the trainer calls this from a worker
thread, the app from a web server, a notebook on any kernel.
"""

from __future__ import annotations

from revacnn.analysis.doctor import Diagnosis, LayerArrays, diagnose_layer, linear_cka
from revacnn.analysis.embedding import EmbeddingTracker, procrustes_align
from revacnn.analysis.patterns import (
    FEATURE_KINDS,
    MONO_THRESHOLD,
    activation_signature,
    cluster_score,
    dominant_channel,
    filter_features,
    rgb_mono_fraction,
    rgb_shares,
)

__all__ = [
    "FEATURE_KINDS",
    "MONO_THRESHOLD",
    "Diagnosis",
    "EmbeddingTracker",
    "LayerArrays",
    "activation_signature",
    "cluster_score",
    "diagnose_layer",
    "dominant_channel",
    "filter_features",
    "linear_cka",
    "procrustes_align",
    "rgb_mono_fraction",
    "rgb_shares",
]
