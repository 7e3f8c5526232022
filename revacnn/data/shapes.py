"""The offline ``shapes`` dataset: generated 32x32 RGB images of coloured shapes, 10 classes.

Each class is one (shape, colour family) pair. Five shapes and five colour families are
paired in a cycle, so every shape appears in exactly two colours and every colour on exactly
two shapes::

    red circle      yellow circle
    yellow square   green square
    green triangle  blue triangle
    blue cross      purple cross
    purple ring     red ring

Neither cue alone is enough:

* **Colour matters.** A colour is drawn as a luminance ``Y`` (BT.601, the weights of
  ``0.299 R + 0.587 G + 0.114 B``) plus a chroma vector in the Cb/Cr plane. The luminance of
  the shape, of the background and of everything else is drawn independently of the class and
  the chroma never changes ``Y``, so the two classes that share a shape (e.g. "red circle" and
  "yellow circle") have the same distribution of greyscale images: a greyscale model cannot
  tell them apart (best possible accuracy 50 %).
* **Shape matters.** Every shape has the area of a circle of the drawn radius, so the two
  classes that share a colour (e.g. "red circle" and "red ring") have nearly the same colour
  histogram: a model that ignores where pixels are cannot tell them apart either.

Nuisance: random position, size, rotation, hue/chroma jitter inside the colour family, a
luminance ramp across the shape, a smooth textured background of random (low-chroma) colour
with a smooth colour texture, a line of random colour behind the shape in half of the
images, and per-pixel luminance noise.

A small CNN learns colour first and shape over several epochs: the ConvNetJS CIFAR-10 net
(conv16 5x5, pool, conv20 5x5, pool, conv20 5x5, pool, softmax; Adam 1e-3, batch 64) on
10,000 images reaches about 50 % validation accuracy after one epoch, 61 % after five and
71 % after ten (still rising), its errors being same-colour shape pairs.

Generation is fully vectorised numpy in chunks of 500 images, each chunk from its own
child of the seed; labels are balanced (class counts differ by at most one).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from revacnn.errors import ConfigError

__all__ = [
    "CLASS_NAMES",
    "COLOURS",
    "SHAPES",
    "IMAGE_SIZE",
    "DEFAULT_TRAIN_SIZE",
    "DEFAULT_VAL_SIZE",
    "make_shapes",
    "load_shapes",
]

IMAGE_SIZE: int = 32
DEFAULT_TRAIN_SIZE: int = 50_000
DEFAULT_VAL_SIZE: int = 10_000
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")
COLOURS: tuple[str, ...] = ("red", "yellow", "green", "blue", "purple")

# Class k = (shape k // 2, colour (k // 2 + k % 2) % 5): the cycle described above.
_CLASS_SHAPE = np.array([k // 2 for k in range(10)], dtype=np.int64)
_CLASS_COLOUR = np.array([(k // 2 + k % 2) % 5 for k in range(10)], dtype=np.int64)
CLASS_NAMES: tuple[str, ...] = tuple(
    f"{COLOURS[c]} {SHAPES[s]}" for s, c in zip(_CLASS_SHAPE, _CLASS_COLOUR, strict=True)
)

# Hue of each colour family: angle (degrees) of its chroma vector in the Cb/Cr plane,
# 72 degrees apart. At mid luminance: red ~(209,92,100), yellow ~(128,149,22),
# green ~(47,175,100), blue ~(86,132,220), purple ~(180,85,212).
_HUE_DEG = np.array([100.0, 172.0, 244.0, 316.0, 28.0])
_HUE_JITTER_DEG = 14.0

# RGB = Y + c * (cos h * _CB + sin h * _CR): BT.601 YCbCr -> RGB, which leaves Y unchanged.
_CB = np.array([0.0, -0.344136, 1.772])
_CR = np.array([1.402, -0.714136, 0.0])

_CHUNK = 500  # images per independently seeded chunk (a multiple of 10)
_MAX_N = 1_000_000

# Size of each shape relative to the radius of a circle of the same area.
_SQUARE_HALF = np.sqrt(np.pi) / 2  # half side
_TRIANGLE_IN = np.sqrt(np.pi / (3 * np.sqrt(3)))  # inradius of the equilateral triangle
_CROSS_W = 0.36  # arm half-width / arm half-length
_CROSS_HALF = np.sqrt(np.pi / (8 * _CROSS_W - 4 * _CROSS_W**2))  # arm half-length
_RING_IN = 0.55  # inner / outer radius
_RING_OUT = 1 / np.sqrt(1 - _RING_IN**2)  # outer radius


def _chroma_limit(y: np.ndarray, hue: np.ndarray, margin: float) -> np.ndarray:
    """Largest chroma that keeps ``Y + chroma`` inside [margin, 255 - margin] on every channel."""
    coef = np.cos(hue)[:, None] * _CB + np.sin(hue)[:, None] * _CR  # (n, 3)
    room_up = (255.0 - margin - y)[:, None]
    room_down = (y - margin)[:, None]
    with np.errstate(divide="ignore"):
        lim = np.where(coef > 0, room_up / coef, np.where(coef < 0, room_down / -coef, np.inf))
    return np.maximum(lim.min(axis=1), 0.0)


def _rgb(y: np.ndarray, hue: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """(n,) luminance, hue (radians) and chroma -> (n, 3) float RGB with exactly that luminance."""
    return (
        y[:, None] + (chroma * np.cos(hue))[:, None] * _CB + (chroma * np.sin(hue))[:, None] * _CR
    )


def _shape_sdf(shape: int, u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Approximate signed distance in pixels (positive inside) of one shape kind.

    Args:
        shape: index into ``SHAPES``.
        u: (k, H, W) pixel coordinates in the shape's rotated frame, centre at 0.
        v: same as ``u``, the other axis.
        r: (k, 1, 1) radius of the circle of equal area.
    """
    if shape == 0:  # circle
        return r - np.sqrt(u * u + v * v)
    if shape == 1:  # square
        return r * _SQUARE_HALF - np.maximum(np.abs(u), np.abs(v))
    if shape == 2:  # equilateral triangle: edge normals at -90, 30 and 150 degrees
        c, s = np.float32(np.sqrt(3) / 2), np.float32(0.5)
        return r * _TRIANGLE_IN - np.maximum(np.maximum(-v, c * u + s * v), s * v - c * u)
    if shape == 3:  # plus-shaped cross
        half = r * _CROSS_HALF
        w = half * _CROSS_W
        au, av = np.abs(u), np.abs(v)
        return np.maximum(np.minimum(half - au, w - av), np.minimum(w - au, half - av))
    rad = np.sqrt(u * u + v * v)  # ring
    outer = r * _RING_OUT
    return np.minimum(outer - rad, rad - outer * _RING_IN)


def _interp_matrix(grid: int, size: int) -> np.ndarray:
    """(size, grid) float32 matrix of bilinear weights upsampling ``grid`` points to ``size``."""
    pos = np.linspace(0, grid - 1, size)
    lo = np.minimum(np.floor(pos).astype(int), grid - 2)
    frac = pos - lo
    mat = np.zeros((size, grid))
    mat[np.arange(size), lo] = 1 - frac
    mat[np.arange(size), lo + 1] += frac
    return mat.astype(np.float32)


_GRID = 5  # background texture: a random 5x5 field, bilinearly upsampled
_UP = _interp_matrix(_GRID, IMAGE_SIZE)
_COORD = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5  # pixel centres
_UNIFORM_SD = np.sqrt((256**2 - 1) / 12)  # standard deviation of uniform bytes 0..255


def _col(a: np.ndarray) -> np.ndarray:
    """(k,) per-image values -> float32 (k, 1, 1), to broadcast over an image plane."""
    return a.astype(np.float32)[:, None, None]


def _make_chunk(
    m: int, rng: np.random.Generator, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Render ``m`` images (uint8 (m, 32, 32, 3)) and their labels (int64 (m,)).

    Every image is a sum of five per-pixel weight planes times five per-image RGB colours::

        image = w_bg * bg_colour + lum * (1, 1, 1) + w_bg * tex_c * tex_colour
                + w_line * line_colour + alpha * shape_colour

    with ``alpha`` the shape's coverage, ``w_line`` the visible part of the line,
    ``w_bg`` the visible background, ``tex_c`` a smooth colour texture and ``lum`` the
    luminance terms (background texture, shading of the shape, noise). The weights are
    computed plane by plane (contiguous, fast), and one batched matrix product mixes them
    into channels-last RGB.

    ``labels`` (for tests) renders the given classes with exactly the random draws that the
    random labels would have had, e.g. the same scene once as "red circle", once as
    "yellow circle".
    """
    size, f32 = IMAGE_SIZE, np.float32
    drawn = rng.permutation(np.arange(m) % 10).astype(np.int64)
    labels = drawn if labels is None else np.asarray(labels, dtype=np.int64)
    shape = _CLASS_SHAPE[labels]
    colour = _CLASS_COLOUR[labels]

    # --- per-image parameters; everything but the hue family is independent of the class
    r = rng.uniform(5.0, 9.5, m)  # radius of the circle of equal area
    cx = rng.uniform(r + 1.5, size - r - 1.5)
    cy = rng.uniform(r + 1.5, size - r - 1.5)
    theta = rng.uniform(0, 2 * np.pi, m)
    # luminance of shape and background, contrast at least 25 grey levels
    y_fg = rng.uniform(65.0, 195.0, m)
    gap = rng.uniform(25.0, 110.0, m) * rng.choice([-1.0, 1.0], m)
    y_bg = np.where((y_fg + gap < 15.0) | (y_fg + gap > 240.0), y_fg - gap, y_fg + gap)
    y_bg = np.clip(y_bg, 15.0, 240.0)
    # shape colour: family hue + jitter, chroma inside the RGB gamut (margin for shading, noise)
    hue = np.deg2rad(_HUE_DEG[colour] + rng.uniform(-_HUE_JITTER_DEG, _HUE_JITTER_DEG, m))
    c_fg = np.minimum(rng.uniform(28.0, 70.0, m), _chroma_limit(y_fg, hue, 28.0))
    ramp_dir = rng.uniform(0, 2 * np.pi, m)
    ramp = rng.uniform(-6.0, 6.0, m) / r  # grey levels per pixel: at most +-9.3 on the shape
    # background: random hue, low chroma, smooth luminance and colour texture
    hue_bg = rng.uniform(0, 2 * np.pi, m)
    c_bg = rng.uniform(0.0, 1.0, m) * np.minimum(_chroma_limit(y_bg, hue_bg, 10.0), 40.0)
    field = rng.standard_normal((m, 2, _GRID, _GRID))
    field[:, 0] *= rng.uniform(4.0, 28.0, m)[:, None, None]  # luminance texture amplitude
    hue_tex = rng.uniform(0, 2 * np.pi, m)
    c_tex = rng.uniform(0.0, 12.0, m)  # colour texture amplitude
    # distractor line (behind the shape) in half of the images
    has_line = rng.random(m) < 0.5
    p0 = rng.uniform(0, size, (m, 2))
    p1 = rng.uniform(0, size, (m, 2))
    width = rng.uniform(0.6, 1.6, m)
    y_line = rng.uniform(30.0, 225.0, m)
    hue_line = rng.uniform(0, 2 * np.pi, m)
    c_line = rng.uniform(0.0, 1.0, m) * _chroma_limit(y_line, hue_line, 5.0)
    # uniform luminance noise, standard deviation 2 to 9 grey levels
    noise_sd = rng.uniform(2.0, 9.0, m)
    noise = rng.integers(0, 256, (m, size, size), dtype=np.uint8)

    xx = _COORD[None, None, :]  # (1, 1, W)
    yy = _COORD[None, :, None]  # (1, H, 1)
    planes = np.empty((m, 5, size, size), dtype=f32)
    w_bg, lum, w_tex, w_line, alpha = (planes[:, i] for i in range(5))

    # --- the shape: anti-aliased coverage, rendered one shape kind at a time
    for s in range(len(SHAPES)):
        idx = np.flatnonzero(shape == s)
        if idx.size == 0:
            continue
        dx, dy = xx - _col(cx[idx]), yy - _col(cy[idx])
        if SHAPES[s] in ("circle", "ring"):  # rotation-invariant
            u, v = dx, dy
        else:
            cos_t, sin_t = _col(np.cos(theta[idx])), _col(np.sin(theta[idx]))
            u = dx * cos_t + dy * sin_t
            v = dy * cos_t - dx * sin_t
        sdf = _shape_sdf(s, u, v, _col(r[idx]))
        sdf += f32(0.5)
        alpha[idx] = np.clip(sdf, 0.0, 1.0, out=sdf)

    # --- distractor line: coverage from the distance to the segment
    sx, sy = _col(p1[:, 0] - p0[:, 0]), _col(p1[:, 1] - p0[:, 1])
    px, py = xx - _col(p0[:, 0]), yy - _col(p0[:, 1])
    t = px * sx + py * sy
    t *= 1.0 / np.maximum(sx * sx + sy * sy, f32(1e-6))
    np.clip(t, 0.0, 1.0, out=t)
    ddx, ddy = px - t * sx, py - t * sy
    ddx *= ddx
    ddy *= ddy
    ddx += ddy
    la = np.subtract(_col(width + 0.5), np.sqrt(ddx, out=ddx), out=ddx)
    np.clip(la, 0.0, 1.0, out=la)
    la *= _col(has_line.astype(float))

    # --- visibility weights: the shape covers the line, both cover the background
    not_alpha = 1.0 - alpha
    np.multiply(la, not_alpha, out=w_line)
    np.subtract(not_alpha, w_line, out=w_bg)

    # --- luminance terms: background texture, shading of the shape, noise (+0.5 rounds)
    tex = _UP @ field.astype(f32) @ _UP.T  # (m, 2, H, W) smooth fields
    np.multiply(w_bg, tex[:, 0], out=lum)
    np.multiply(w_bg, tex[:, 1], out=w_tex)
    gx, gy = ramp * np.cos(ramp_dir), ramp * np.sin(ramp_dir)
    shade = _col(gx) * xx + _col(gy) * yy - _col(gx * cx + gy * cy)  # (m, H, W)
    shade *= alpha
    lum += shade
    nz = noise.astype(f32)
    nz -= f32(127.5)
    nz *= _col(noise_sd / _UNIFORM_SD)
    nz += f32(0.5)
    lum += nz

    # --- per-image colours of the five planes, mixed into channels-last RGB
    colours = np.empty((m, 5, 3), dtype=f32)
    colours[:, 0] = _rgb(y_bg, hue_bg, c_bg)
    colours[:, 1] = 1.0
    colours[:, 2] = _rgb(np.zeros(m), hue_tex, c_tex)
    colours[:, 3] = _rgb(y_line, hue_line, c_line)
    colours[:, 4] = _rgb(y_fg, hue, c_fg)
    img = np.matmul(planes.reshape(m, 5, size * size).transpose(0, 2, 1), colours)
    np.clip(img, 0.0, 255.0, out=img)
    return img.astype(np.uint8).reshape(m, size, size, 3), labels


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    """Return ``value`` as an int if it is an integer in [lo, hi], else raise ConfigError."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if ok and value >= lo and (hi is None or value <= hi):
        return int(value)
    expected = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"
    raise ConfigError(
        f"Invalid {name} for the shapes dataset. Received: {name}={value!r} (expected {expected})"
    )


def make_shapes(n: int, seed: int, *, stream: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``n`` images of the ``shapes`` dataset.

    The images are made in chunks of 500, each from its own child of
    ``SeedSequence([seed, stream])``, on up to four threads (numpy releases the GIL).
    The result does not depend on the number of threads, and when ``n`` is a multiple of 500,
    ``make_shapes(n, seed)`` is the first ``n`` images of ``make_shapes(m, seed)`` for any
    ``m > n``.

    Args:
        n: number of images, 1 to 1,000,000.
        seed: a non-negative integer; the same ``(n, seed, stream)`` always gives the same
            images.
        stream: which independent stream of the seed to draw from. `load_shapes` uses
            stream 0 for training and stream 1 for validation, so the splits never share
            images.

    Returns:
        ``(x, y)``: uint8 images (n, 32, 32, 3), channels-last RGB, and int64 labels (n,)
        indexing `CLASS_NAMES`. Classes are balanced (counts differ by at most one).

    Raises:
        ConfigError: ``n``, ``seed`` or ``stream`` is not an integer in its range.

    Example:
        >>> x, y = make_shapes(20, seed=0)
        >>> x.shape, x.dtype, y.dtype
        ((20, 32, 32, 3), dtype('uint8'), dtype('int64'))
        >>> sorted(set(y.tolist())) == list(range(10))
        True
    """
    n = _check_int("n", n, 1, _MAX_N)
    seed = _check_int("seed", seed, 0)
    stream = _check_int("stream", stream, 0)
    n_chunks = -(-n // _CHUNK)
    children = np.random.SeedSequence([seed, stream]).spawn(n_chunks)
    x = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    y = np.empty(n, dtype=np.int64)

    def fill(i: int) -> None:
        lo, hi = i * _CHUNK, min(n, (i + 1) * _CHUNK)
        x[lo:hi], y[lo:hi] = _make_chunk(hi - lo, np.random.default_rng(children[i]))

    workers = min(
        4,
        n_chunks,
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
    )
    if workers <= 1:
        for i in range(n_chunks):
            fill(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(fill, range(n_chunks)))
    return x, y


def load_shapes(
    train_size: int | None = None, val_size: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Generate the training and validation splits of ``shapes``.

    Args:
        train_size: training images (default 50,000).
        val_size: validation images (default 10,000).
        seed: the seed; training uses stream 0 of it and validation stream 1, so the two
            splits never share an image.

    Returns:
        ``(x_train, y_train, x_val, y_val)`` as from `make_shapes`.

    Raises:
        ConfigError: a size or the seed is out of range.

    Example:
        >>> x, y, xv, yv = load_shapes(train_size=100, val_size=50, seed=1)
        >>> x.shape, xv.shape
        ((100, 32, 32, 3), (50, 32, 32, 3))
    """
    train_size = DEFAULT_TRAIN_SIZE if train_size is None else train_size
    val_size = DEFAULT_VAL_SIZE if val_size is None else val_size
    x_train, y_train = make_shapes(_check_int("train_size", train_size, 1, _MAX_N), seed, stream=0)
    x_val, y_val = make_shapes(_check_int("val_size", val_size, 1, _MAX_N), seed, stream=1)
    return x_train, y_train, x_val, y_val
