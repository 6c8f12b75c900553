"""Pictures: image grids, reverse-chain strips and GIFs, forward-process strips, 2-D scatter plots, line plots.

Every picture is first a pure function returning a uint8 array ([H, W, C], C = 1 or 3); the ``save_*`` functions
only write it with Pillow (PNG, or GIF for animations) and create missing parent directories. Timestep labels
are the code's indices t in [0, T-1]; index t is the paper's timestep t + 1.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ddpm_jax.data.images import to_uint8, uint8_to_float
from ddpm_jax.diffusion import q_sample
from ddpm_jax.parts import write_atomically
from ddpm_jax.schedules import Schedule

DATA_COLOR = (150, 150, 150)
SAMPLE_COLOR = (31, 119, 180)
_FONT = ImageFont.load_default()
_LABEL_HEIGHT = _FONT.getbbox("0Ag")[3] + 4  # one line of text plus a small margin
_BLOCK_GAP = 4  # pixels between the x_t and predicted-x_0 blocks, so they read as two pictures


def _auto_scale(height: int) -> int:
    """Integer upscale that makes a tile at least ~32 px tall (8x8 digits -> 4x), so labels fit above it."""
    return max(1, 32 // height)


def image_grid(images, ncols: int | None = None, padding: int = 1, pad_value: int = 255, scale: int = 1):
    """[N, H, W, C] (C = 1 or 3, floats in [-1, 1] or uint8) -> uint8 [H', W', C] grid, row-major.

    ``ncols`` defaults to ceil(sqrt(N)); tiles are upscaled ``scale`` times (nearest neighbour) and separated
    and framed by ``padding`` pixels of ``pad_value``. Empty cells of the last row are ``pad_value``.
    """
    images = to_uint8(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or not len(images):
        raise ValueError(f"image_grid needs at least one image [N, H, W, C] with C = 1 or 3, got shape "
                         f"{images.shape}")
    if scale < 1 or padding < 0 or (ncols is not None and ncols < 1):
        raise ValueError(f"scale and ncols must be >= 1 and padding >= 0, got scale={scale}, ncols={ncols}, "
                         f"padding={padding}")
    num, height, width, channels = images.shape
    ncols = min(num, ncols or math.ceil(math.sqrt(num)))
    nrows = math.ceil(num / ncols)
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    tile_h, tile_w = height * scale + padding, width * scale + padding
    grid = np.full((nrows * tile_h + padding, ncols * tile_w + padding, channels), pad_value, np.uint8)
    for index, image in enumerate(images):
        top, left = padding + (index // ncols) * tile_h, padding + (index % ncols) * tile_w
        grid[top : top + height * scale, left : left + width * scale] = image
    return grid


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _text_fill(pad_value: int, channels: int):
    """Black text on a light background, white on a dark one, in the image's colour mode."""
    value = 0 if pad_value >= 128 else 255
    return value if channels == 1 else (value,) * 3


def _add_labels(grid: np.ndarray, pad_value: int, top=(), left=()) -> np.ndarray:
    """Prepend a header band (if ``top``) and a left band (if ``left``) of ``pad_value`` and write labels in them.

    ``top``: (x centre in ``grid``, text) pairs; ``left``: (y centre in ``grid``, text) pairs.
    """
    band_h = _LABEL_HEIGHT if top else 0
    band_w = max((int(_FONT.getlength(text)) + 6 for _, text in left), default=0)
    height, width, channels = grid.shape
    out = np.full((band_h + height, band_w + width, channels), pad_value, np.uint8)
    out[band_h:, band_w:] = grid
    canvas = _to_pil(out)
    draw = ImageDraw.Draw(canvas)
    fill = _text_fill(pad_value, channels)
    # Positions from the text's width and the fixed line height (no `anchor`: bitmap fonts do not support it).
    for x, text in top:
        draw.text((band_w + x - _FONT.getlength(text) / 2, 1), text, fill=fill, font=_FONT)
    for y, text in left:
        draw.text((3, band_h + y - _LABEL_HEIGHT / 2), text, fill=fill, font=_FONT)
    return np.asarray(canvas).reshape(out.shape)


def _column_centres(num_cols: int, tile_width: int, padding: int) -> list[float]:
    return [padding + j * (tile_width + padding) + tile_width / 2 for j in range(num_cols)]


def _trajectories_uint8(traj_x, traj_pred_x0, num_examples: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The first ``num_examples`` of the records [R, N, H, W, C] x and predicted x_0 (or None) as uint8, each
    converted once."""
    traj_x = np.asarray(traj_x)
    if traj_x.ndim != 5:
        raise ValueError(f"a trajectory is [records, examples, H, W, C], got shape {traj_x.shape}")
    if traj_pred_x0 is not None:
        traj_pred_x0 = np.asarray(traj_pred_x0)
        if traj_pred_x0.shape != traj_x.shape:
            raise ValueError(f"traj_pred_x0 {traj_pred_x0.shape} must have the shape of traj_x {traj_x.shape}")
        traj_pred_x0 = to_uint8(traj_pred_x0[:, :num_examples])
    return to_uint8(traj_x[:, :num_examples]), traj_pred_x0


def chain_strip(
    traj_x,
    traj_pred_x0=None,
    timesteps=None,
    num_examples: int = 8,
    scale: int | None = None,
    padding: int = 1,
    pad_value: int = 255,
    x_label: str = "x_t",
) -> np.ndarray:
    """Reverse chain as a picture: [R, N, H, W, C] records -> uint8, rows = examples, columns = records.

    A block of x (named ``x_label``), and below it a block of predicted x_0 when ``traj_pred_x0`` is given; the
    blocks are named in a left band and the columns labelled with ``timesteps`` in a header band. ``scale`` None
    -> tiles ~32 px. A sampler's Trajectory holds the state after the step at each t ("x_after").
    """
    traj_x, traj_pred_x0 = _trajectories_uint8(traj_x, traj_pred_x0, num_examples)
    num_records, _, height, width, channels = traj_x.shape
    scale = scale or _auto_scale(height)
    blocks = [(x_label, traj_x)] + ([("x0_hat", traj_pred_x0)] if traj_pred_x0 is not None else [])
    grids, left_labels, top = [], [], 0
    for name, traj in blocks:
        tiles = np.swapaxes(traj, 0, 1).reshape(-1, height, width, channels)
        grid = image_grid(tiles, ncols=num_records, padding=padding, pad_value=pad_value, scale=scale)
        left_labels.append((top + grid.shape[0] / 2, name))
        grids += [grid, np.full((_BLOCK_GAP,) + grid.shape[1:], pad_value, np.uint8)]
        top += grid.shape[0] + _BLOCK_GAP
    top_labels = ()
    if timesteps is not None:
        centres = _column_centres(num_records, width * scale, padding)
        top_labels = [(x, str(int(t))) for x, t in zip(centres, np.asarray(timesteps), strict=True)]
    return _add_labels(np.concatenate(grids[:-1]), pad_value, top=top_labels, left=left_labels)


def interpolation_strip(
    x0_a, x0_b, images, lambdas, scale: int | None = None, padding: int = 1, pad_value: int = 255
) -> np.ndarray:
    """Interpolations as a picture (Ho et al. 2020, Fig. 8): one row per pair, its source x0_a [P, H, W, C], the
    decoded images [L, P, H, W, C] for each lambda, then its source x0_b; the columns labelled with lambda."""
    images, x0_a, x0_b = to_uint8(images), to_uint8(x0_a), to_uint8(x0_b)
    num_lambdas, num_pairs, height, width, channels = images.shape
    scale = scale or _auto_scale(height)
    rows = np.concatenate([x0_a[None], images, x0_b[None]])  # [L + 2, P, ...]
    tiles = np.swapaxes(rows, 0, 1).reshape(-1, height, width, channels)
    grid = image_grid(tiles, ncols=num_lambdas + 2, padding=padding, pad_value=pad_value, scale=scale)
    labels = ["x0", *(f"{lam:.2g}" for lam in np.asarray(lambdas)), "x0'"]
    centres = _column_centres(num_lambdas + 2, width * scale, padding)
    return _add_labels(grid, pad_value, top=list(zip(centres, labels, strict=True)))


def latent_samples_grid(
    x0, x_t, samples, timesteps, scale: int | None = None, padding: int = 1, pad_value: int = 255
) -> np.ndarray:
    """Samples from frozen latents as a picture (Ho et al. 2020, Fig. 7): for each image of x0 [B, H, W, C] and each
    of the S ``timesteps``, a row with x0, its latent x_t (x_t [S, B, ...]) and the K draws of p(x_0 | x_t)
    (samples [S, K, B, ...]); rows labelled with t, columns "x0", "x_t" and the draws' numbers."""
    x0, x_t, samples = to_uint8(x0), to_uint8(x_t), to_uint8(samples)
    num_steps, num_draws, num_images, height, width, channels = samples.shape
    scale = scale or _auto_scale(height)
    rows = [
        np.concatenate([x0[b][None], x_t[i, b][None], samples[i, :, b]])
        for b in range(num_images) for i in range(num_steps)
    ]
    grid = image_grid(np.concatenate(rows), ncols=num_draws + 2, padding=padding, pad_value=pad_value, scale=scale)
    top = zip(_column_centres(num_draws + 2, width * scale, padding),
              ["x0", "x_t", *(str(k + 1) for k in range(num_draws))], strict=True)
    row_centres = _column_centres(len(rows), height * scale, padding)
    left = [(y, f"t={int(timesteps[r % num_steps])}") for r, y in enumerate(row_centres)]
    return _add_labels(grid, pad_value, top=list(top), left=left)


def _widened(panel: np.ndarray, width: int, pad_value: int) -> np.ndarray:
    """``panel`` centred in ``width`` columns of ``pad_value`` where it is narrower."""
    extra = max(0, width - panel.shape[1])
    return np.pad(panel, ((0, 0), (extra // 2, extra - extra // 2), (0, 0)), constant_values=pad_value)


def chain_frames(
    traj_x,
    traj_pred_x0=None,
    timesteps=None,
    num_examples: int = 16,
    scale: int | None = None,
    padding: int = 1,
    pad_value: int = 255,
    x_label: str = "x_t",
) -> np.ndarray:
    """Animation frames uint8 [R, H', W', C]: at each record a grid of x (``x_label``), beside it predicted x_0."""
    traj_x, traj_pred_x0 = _trajectories_uint8(traj_x, traj_pred_x0, num_examples)
    num_records, height = traj_x.shape[0], traj_x.shape[2]
    grid_kw = dict(padding=padding, pad_value=pad_value, scale=scale or _auto_scale(height))
    x_labels = [x_label + ("" if timesteps is None else f", t={int(t)}") for t in (
        [None] * num_records if timesteps is None else np.asarray(timesteps))]
    # Panels as wide as their longest label in any frame: a few small images cut it off, and frames of one size.
    min_width = int(max(_FONT.getlength(text) for text in [*x_labels, "x0_hat"])) + 2
    frames = []
    for r in range(num_records):
        panels = [_widened(image_grid(traj_x[r], **grid_kw), min_width, pad_value)]
        labels = [(panels[0].shape[1] / 2, x_labels[r])]
        if traj_pred_x0 is not None:
            gap = np.full((panels[0].shape[0], _BLOCK_GAP * 2, traj_x.shape[-1]), pad_value, np.uint8)
            panels += [gap, _widened(image_grid(traj_pred_x0[r], **grid_kw), min_width, pad_value)]
            labels.append((panels[0].shape[1] + gap.shape[1] + panels[2].shape[1] / 2, "x0_hat"))
        frames.append(_add_labels(np.concatenate(panels, axis=1), pad_value, top=labels))
    return np.stack(frames)


def forward_process_strip(
    schedule: Schedule,
    image,
    key: jax.Array,
    timesteps=None,
    scale: int | None = None,
    padding: int = 1,
    pad_value: int = 255,
) -> np.ndarray:
    """x_t ~ q(x_t | x_0) (Eq. 4) of ``image`` [H, W, C] or [N, H, W, C] (in [-1, 1], or uint8) at ``timesteps``, one
    row each.

    One noise draw eps ~ N(0, I) from ``key`` is shared by all t, so the row shows the same image gradually
    drowned. ``timesteps`` default: 0, T/10, 2T/10, ..., T-1 (index t is the paper's t + 1).
    """
    images = np.asarray(image)
    if images.dtype.kind in "biu" and images.dtype != np.uint8:  # as to_uint8: read as floats, all white
        raise ValueError(f"images must be floats in [-1, 1] or uint8, got {images.dtype}")
    images = uint8_to_float(images) if images.dtype == np.uint8 else images.astype(np.float32)
    images = images[None] if images.ndim == 3 else images
    if timesteps is None:
        last = schedule.num_timesteps - 1
        timesteps = np.unique(np.append(np.arange(0, last, max(1, schedule.num_timesteps // 10)), last))
    timesteps = np.asarray(timesteps, np.int32)
    noise = jax.random.normal(key, images.shape, np.float32)
    x_t = [q_sample(schedule, images, np.full(len(images), t, np.int32), noise) for t in timesteps]
    return chain_strip(np.stack(x_t), None, timesteps, len(images), scale, padding, pad_value)


def _fit_extent(*point_sets) -> tuple[float, float, float, float]:
    """Square (xmin, xmax, ymin, ymax) holding all finite points with a 5% margin, so shapes are not distorted."""
    points = np.concatenate([np.asarray(p, np.float64).reshape(-1, 2) for p in point_sets])
    points = points[np.isfinite(points).all(axis=1)]
    if len(points) == 0:
        return (-1.0, 1.0, -1.0, 1.0)
    centre = (points.min(axis=0) + points.max(axis=0)) / 2
    half = max(float((points.max(axis=0) - points.min(axis=0)).max()) / 2 * 1.05, 1e-6)
    return (centre[0] - half, centre[0] + half, centre[1] - half, centre[1] + half)


def _central(points, fraction: float = 0.98) -> np.ndarray:
    """The finite [N, 2] points within the central ``fraction`` of each coordinate (a few diverged samples out)."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    points = points[np.isfinite(points).all(axis=1)]
    if len(points) == 0:
        return points
    # The nearest points outward, so that a few points keep their extremes (interpolation dropped both ends).
    low = np.quantile(points, (1 - fraction) / 2, axis=0, method="lower")
    high = np.quantile(points, (1 + fraction) / 2, axis=0, method="higher")
    return points[((points >= low) & (points <= high)).all(axis=1)]


def _to_pixels(points, extent, size: int) -> np.ndarray:
    """[N, 2] data coordinates -> [K, 2] (column, row) pixels of a size x size panel, y up; drops the points
    that are not finite or fall outside the panel (far ones would overflow int64)."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    points = points[np.isfinite(points).all(axis=1)]
    xmin, xmax, ymin, ymax = extent
    cols = (points[:, 0] - xmin) / (xmax - xmin) * (size - 1)
    rows = (ymax - points[:, 1]) / (ymax - ymin) * (size - 1)
    pixels = np.rint(np.stack([cols, rows], axis=1))
    return pixels[((pixels >= 0) & (pixels <= size - 1)).all(axis=1)].astype(np.int64)


def _scatter_panel(points, extent, size: int, color, name: str, radius: int) -> np.ndarray:
    """One size x size RGB panel of dots with a light frame, ``name`` in a header band above it."""
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, size - 1, size - 1), outline=(210, 210, 210))
    pixels = _to_pixels(points, extent, size)
    for col, row in pixels:
        draw.rectangle((col - radius, row - radius, col + radius, row + radius), fill=color)
    total = len(np.asarray(points).reshape(-1, 2))
    if len(pixels) < total:
        name = f"{name} ({total - len(pixels)} of {total} off the panel)"
    return _add_labels(np.asarray(canvas), 255, top=[(size / 2, name)])


def _side_by_side(panels: list[np.ndarray], title: str | None) -> np.ndarray:
    """Panels left to right with white gaps, under a title line when ``title`` is given."""
    gap = np.full((panels[0].shape[0], 8, 3), 255, np.uint8)
    row = np.concatenate([part for panel in panels for part in (panel, gap)][:-1], axis=1)
    return _add_labels(row, 255, top=[(row.shape[1] / 2, title)]) if title else row


def _points(points, name: str) -> np.ndarray:
    """``points`` [..., 2] as an array; others are refused (a reshape to pairs would scramble [N, 3] points)."""
    points = np.asarray(points)
    if points.ndim < 2 or points.shape[-1] != 2:
        raise ValueError(f"{name} must be 2-D points [..., 2], got shape {points.shape}")
    return points


def scatter_plot(samples, data=None, size: int = 512, extent=None, title: str | None = None, radius: int = 1):
    """2-D point clouds -> uint8 RGB: panel "data" (grey, if given) beside panel "samples" (blue).

    Both panels share ``extent`` = (xmin, xmax, ymin, ymax), by default a square fitted to the central 98% of the
    samples and to the data (a few diverged samples shrank the rest to a dot); each point is a (2 radius + 1)-pixel
    square, points outside the extent or not finite are not drawn and counted in the header.
    """
    samples, data = _points(samples, "samples"), None if data is None else _points(data, "data")
    extent = extent or _fit_extent(_central(samples), *(() if data is None else (data,)))
    panels = [] if data is None else [_scatter_panel(data, extent, size, DATA_COLOR, "data", radius)]
    panels.append(_scatter_panel(samples, extent, size, SAMPLE_COLOR, "samples", radius))
    return _side_by_side(panels, title)


def scatter_trajectory_strip(traj_x, timesteps=None, size: int = 160, extent=None, radius: int = 0):
    """Reverse chain of 2-D points [R, N, 2] -> uint8 RGB: one panel per record, labelled with its timestep.

    The default ``extent`` fits the central 98% of every record, so the panels show the cloud contracting onto the
    data (one diverged chain put the other points of each panel in one pixel).
    """
    traj_x = _points(traj_x, "traj_x")
    if traj_x.ndim != 3:
        raise ValueError(f"traj_x must be [records, N, 2], got shape {traj_x.shape}")
    extent = extent or _fit_extent(*map(_central, traj_x))
    names = [""] * len(traj_x) if timesteps is None else [f"t={int(t)}" for t in np.asarray(timesteps)]
    panels = [_scatter_panel(x, extent, size, SAMPLE_COLOR, n, radius) for x, n in zip(traj_x, names, strict=True)]
    return _side_by_side(panels, None)


def _tick(value: float) -> str:
    return f"{value:.4g}"


def _ticks(values: np.ndarray, lo: float, hi: float) -> tuple[float, float, float]:
    """The ends and the middle of an axis from ``lo`` to ``hi``; the middle rounded down where ``values`` are
    integers."""
    middle = (lo + hi) / 2
    return lo, float(np.floor(middle)) if np.all(values == np.round(values)) else middle, hi


def line_panel(x, y, title: str, x_name: str, size: tuple[int, int] = (340, 240)) -> np.ndarray:
    """A curve y(x) -> uint8 RGB: axes from the data's range, the ends and middle of each axis labelled,
    ``title`` above and ``x_name`` below. Non-finite points are left out."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    width, height = size
    left, right, top, bottom = 8 + int(_FONT.getlength("0.000e+00")), 12, 6, 2 * _LABEL_HEIGHT + 4
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = left, top, width - right, height - bottom  # the plot area, y down
    draw.rectangle((x0, y0, x1, y1), outline=(120, 120, 120))
    if len(x):
        xlo, xhi = (float(x.min()), float(x.max())) if x.max() > x.min() else (float(x[0]) - 1, float(x[0]) + 1)
        ylo, yhi = (float(y.min()), float(y.max())) if y.max() > y.min() else (float(y[0]) - 1, float(y[0]) + 1)
        cols = x0 + (x - xlo) / (xhi - xlo) * (x1 - x0)
        rows = y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)
        draw.line(list(zip(cols.tolist(), rows.tolist(), strict=True)), fill=SAMPLE_COLOR, width=2)
        # Integer data (reverse steps) get an integer middle tick, where it falls: 20.5 read as a step.
        x_ticks, y_ticks = (_ticks(values, lo, hi) for values, lo, hi in ((x, xlo, xhi), (y, ylo, yhi)))
        for x_value, y_value in zip(x_ticks, y_ticks, strict=True):
            col, row = x0 + (x_value - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y_value - ylo) / (yhi - ylo) * (y1 - y0)
            draw.line((col, y1, col, y1 + 3), fill=(120, 120, 120))
            draw.line((x0 - 3, row, x0, row), fill=(120, 120, 120))
            x_text, y_text = _tick(x_value), _tick(y_value)
            x_left = min(max(col - _FONT.getlength(x_text) / 2, 0), width - _FONT.getlength(x_text))
            draw.text((x_left, y1 + 4), x_text, fill=(0, 0, 0), font=_FONT)
            draw.text((x0 - 5 - _FONT.getlength(y_text), row - _LABEL_HEIGHT / 2), y_text, fill=(0, 0, 0), font=_FONT)
    draw.text(((x0 + x1 - _FONT.getlength(x_name)) / 2, y1 + 4 + _LABEL_HEIGHT), x_name, fill=(0, 0, 0), font=_FONT)
    return _add_labels(np.asarray(canvas), 255, top=[(width / 2, title)])


def rate_distortion_plot(reverse_steps, rate_bpd, distortion_rmse, title: str | None = None) -> np.ndarray:
    """Ho et al. 2020 Fig. 5 -> uint8 RGB: distortion and rate against the reverse step, and distortion against rate
    (`likelihood.rate_distortion`'s fields)."""
    panels = [
        line_panel(reverse_steps, distortion_rmse, "distortion (RMSE, [0, 255])", "reverse process steps (T - t + 1)"),
        line_panel(reverse_steps, rate_bpd, "rate (bits/dim)", "reverse process steps (T - t + 1)"),
        line_panel(rate_bpd, distortion_rmse, "distortion (RMSE, [0, 255])", "rate (bits/dim)"),
    ]
    return _side_by_side(panels, title)


def save_png(path, image: np.ndarray) -> Path:
    """Write a uint8 [H, W, C] picture as PNG (grayscale when C = 1), creating parent directories.

    Written atomically: a run killed while writing leaves no truncated picture that a resume would take as drawn.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"save_png writes uint8 [H, W, C] pictures with C = 1 or 3, got {image.dtype} "
                         f"{image.shape}: convert images in [-1, 1] with to_uint8 (or use save_image_grid)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = _to_pil(image)
    write_atomically(str(path), lambda f: picture.save(f, format="PNG"))
    return path


def save_image_grid(path, images, **grid_kw) -> Path:
    """`image_grid` written as PNG."""
    return save_png(path, image_grid(images, **grid_kw))


def save_scatter(path, samples, data=None, **scatter_kw) -> Path:
    """`scatter_plot` written as PNG."""
    return save_png(path, scatter_plot(samples, data, **scatter_kw))


def save_forward_process(path, schedule: Schedule, image, key: jax.Array, **strip_kw) -> Path:
    """`forward_process_strip` written as PNG."""
    return save_png(path, forward_process_strip(schedule, image, key, **strip_kw))


def save_chain_gif(
    path, traj_x, traj_pred_x0=None, timesteps=None, duration_ms: int = 120, final_hold_ms: int = 2000, **frame_kw
) -> Path:
    """`chain_frames` written (atomically) as a looping GIF, the last frame (the samples) held for
    ``final_hold_ms``. GIF has 256 colours a frame: RGB frames are approximated (`chain_strip` is exact)."""
    frames = [_to_pil(f) for f in chain_frames(traj_x, traj_pred_x0, timesteps, **frame_kw)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    durations = [duration_ms] * (len(frames) - 1) + [final_hold_ms]
    write_atomically(str(path), lambda f: frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:],
                                                         duration=durations, loop=0))
    return path
