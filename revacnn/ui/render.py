"""Turning filter arrays into pictures: colour maps, PNG data URIs and tile sprites (numpy + Pillow)."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from bokeh.palettes import Inferno256, RdBu11
from PIL import Image

__all__ = [
    "Sprite",
    "activation_rgb",
    "activation_scale",
    "display_images",
    "kernel_channels_rgb",
    "kernel_rgb",
    "png_data_uri",
    "rgba_uint32",
    "sprite",
]


def _lut(palette: list[str] | tuple[str, ...], n: int = 256) -> np.ndarray:
    rgb = np.array([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in palette], dtype=np.float64)
    if len(rgb) != n:
        x = np.linspace(0, len(rgb) - 1, n)
        rgb = np.stack([np.interp(x, np.arange(len(rgb)), rgb[:, k]) for k in range(3)], axis=1)
    return np.round(rgb).astype(np.uint8)


#: 256-entry colour tables: activations (inferno: dark = silent) and signed weights (blue-white-red).
ACT_LUT = _lut(Inferno256)
DIVERGING_LUT = _lut(tuple(reversed(RdBu11)))


def display_images(images: np.ndarray) -> np.ndarray:
    """``(N, H, W, C)`` images of any dtype as ``(N, H, W, 3)`` uint8 for display.

    uint8 images (and integer images within 0..255) are shown as they are. Anything else (e.g.
    standardized floats, as a model may see them) gets a per-image display range: each image's
    own minimum to maximum maps to 0..255. One channel is repeated to grey RGB.

    Example:
        >>> display_images(np.array([[[[-1.0], [1.0]]]])).tolist()
        [[[[0, 0, 0], [255, 255, 255]]]]
    """
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    x = x[..., :3]
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.integer) and x.size and x.min() >= 0 and x.max() <= 255:
        return x.astype(np.uint8)
    v = np.nan_to_num(x.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    axes = tuple(range(1, v.ndim))
    lo, hi = v.min(axis=axes, keepdims=True), v.max(axis=axes, keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    return np.clip(np.round((v - lo) / span * 255.0), 0, 255).astype(np.uint8)


def png_data_uri(rgb: np.ndarray) -> str:
    """A ``data:image/png;base64,…`` URI of an ``(H, W, 3)`` or ``(H, W, 4)`` uint8 image.

    Example:
        >>> png_data_uri(np.zeros((2, 2, 3), np.uint8)).startswith("data:image/png;base64,")
        True
    """
    img = Image.fromarray(np.ascontiguousarray(rgb))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def activation_scale(acts: np.ndarray) -> np.ndarray:
    """Per-filter brightness scale of ``(P, F, H, W)`` activations: each filter's max over all probes.

    One scale per filter (not per tile) keeps a filter's tiles comparable across probes, and a
    silent (dead) filter stays dark instead of having its noise stretched to full brightness.

    Example:
        >>> activation_scale(np.ones((2, 3, 4, 4))).shape
        (3,)
    """
    a = np.asarray(acts, dtype=np.float32)
    if a.ndim != 4 or a.shape[0] == 0:
        return np.ones(a.shape[1] if a.ndim > 1 else 0, np.float32)
    a = a.transpose(1, 0, 2, 3).reshape(a.shape[1], -1)
    m = np.maximum(a.max(axis=1), -a.min(axis=1))
    if not np.isfinite(m).all():  # NaN from a diverged run: fall back to the slower NaN-aware max
        m = np.nan_to_num(np.nanmax(np.abs(a), axis=1), nan=0.0, posinf=0.0, neginf=0.0)
    return m


def activation_rgb(maps: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """Colour ``(F, H, W)`` activation maps with the activation colour map: ``(F, H, W, 3)`` uint8.

    Args:
        maps: one probe's maps, one per filter.
        scale: per-filter value shown at full brightness (default: each map's own max).

    Example:
        >>> activation_rgb(np.random.rand(4, 8, 8)).shape
        (4, 8, 8, 3)
    """
    m = np.asarray(maps, dtype=np.float32)
    if scale is None:
        scale = np.nanmax(np.abs(m.reshape(len(m), -1)), axis=1) if m.size else np.zeros(len(m))
    s = np.asarray(scale, dtype=np.float32).reshape(-1, 1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(s > 0, m / s, 0.0)
    v = np.nan_to_num(v, nan=0.0, posinf=1.0, neginf=0.0)
    idx = np.clip(v * 255.0, 0, 255).astype(np.uint8)
    return ACT_LUT[idx]


def kernel_rgb(kernel: np.ndarray) -> np.ndarray:
    """First-layer filters as pictures: ``(F, kh, kw, c)`` -> ``(F, kh, kw, 3)`` uint8.

    Each filter is stretched to its own min..max (what ConvNetJS and ReVACNN drew). RGB kernels
    show their colours; other channel counts show the channel mean in grey.

    Example:
        >>> kernel_rgb(np.random.randn(4, 5, 5, 3)).shape
        (4, 5, 5, 3)
    """
    k = np.asarray(kernel, dtype=np.float32)
    if k.ndim != 4:
        raise ValueError(f"Received: kernel of shape {k.shape} (expected (F, kh, kw, c))")
    if k.shape[-1] != 3:
        k = np.repeat(k.mean(axis=-1, keepdims=True), 3, axis=-1)
    flat = k.reshape(len(k), -1)
    lo = flat.min(axis=1).reshape(-1, 1, 1, 1) if len(k) else 0
    hi = flat.max(axis=1).reshape(-1, 1, 1, 1) if len(k) else 1
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(hi > lo, (k - lo) / (hi - lo), 0.5)
    return np.clip(np.nan_to_num(v, nan=0.5) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def kernel_channels_rgb(kernel: np.ndarray) -> np.ndarray:
    """One filter's weights per input channel, blue (negative) to red (positive): ``(c, kh, kw, 3)``.

    Example:
        >>> kernel_channels_rgb(np.random.randn(3, 3, 16)).shape
        (16, 3, 3, 3)
    """
    k = np.asarray(kernel, dtype=np.float32)
    if k.ndim != 3:
        raise ValueError(f"Received: kernel of shape {k.shape} (expected (kh, kw, c))")
    m = float(np.nanmax(np.abs(k))) if k.size else 0.0
    v = 0.5 + 0.5 * (k / m if m > 0 else k * 0)
    idx = np.clip(np.nan_to_num(v, nan=0.5) * 255.0, 0, 255).astype(np.uint8)
    return np.moveaxis(DIVERGING_LUT[idx], 2, 0)


@dataclass(frozen=True)
class Sprite:
    """Tiles of equal size side by side in one PNG, for CSS ``background-position`` cut-outs.

    Each tile is surrounded by ``pad`` pixels that repeat its edge, so that a browser scaling the
    sprite by a fractional factor never shows a sliver of the neighbouring tile.

    Attributes:
        uri: the PNG as a data URI.
        n: number of tiles.
        tile_h: height of a tile in image pixels (without padding).
        tile_w: width of a tile in image pixels (without padding).
        pad: edge pixels around each tile.
    """

    uri: str
    n: int
    tile_h: int
    tile_w: int
    pad: int = 0

    def css(self) -> dict[str, int | str]:
        """What the browser needs to cut tiles out: ``{uri, n, w, h, pad}``."""
        return {"uri": self.uri, "n": self.n, "w": self.tile_w, "h": self.tile_h, "pad": self.pad}


def sprite(tiles: np.ndarray, pad: int = 1) -> Sprite:
    """Pack ``(N, H, W, 3)`` uint8 tiles left to right into one PNG `Sprite` (edge-padded).

    Example:
        >>> sprite(np.zeros((3, 4, 4, 3), np.uint8)).n
        3
    """
    t = np.asarray(tiles, dtype=np.uint8)
    n, h, w = t.shape[:3]
    if n == 0:
        return Sprite("", 0, h, w, pad)
    if pad:
        t = np.pad(t, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    hh, ww = t.shape[1:3]
    strip = t.transpose(1, 0, 2, 3).reshape(hh, n * ww, t.shape[3])
    return Sprite(png_data_uri(strip), n, h, w, pad)


def rgba_uint32(rgb: np.ndarray, alpha: int = 255) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 image as the ``(H, W)`` uint32 array Bokeh's ``image_rgba`` draws.

    The rows are flipped because Bokeh's images grow upwards.

    Example:
        >>> rgba_uint32(np.zeros((2, 3, 3), np.uint8)).shape
        (2, 3)
    """
    h, w = rgb.shape[:2]
    out = np.empty((h, w, 4), dtype=np.uint8)
    out[..., :3] = rgb[..., :3]
    out[..., 3] = alpha
    return out.view(np.uint32).reshape(h, w)[::-1].copy()
