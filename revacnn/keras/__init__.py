"""The Keras-native path: `RevacnnCallback` records a user's own ``model.fit`` (framework glue kept out of the core)."""

from __future__ import annotations

from .callback import RevacnnCallback

__all__ = ["RevacnnCallback"]
