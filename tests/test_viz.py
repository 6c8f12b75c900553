"""Pictures: exact pixel layout of grids and strips, value mapping, scatter pixel positions, GIF read-back."""

import os

import jax
import ml_dtypes
import numpy as np
import pytest
from PIL import Image, ImageDraw

import ddpm_jax as dj
from ddpm_jax import generation, viz
from ddpm_jax.data import uint8_to_float


def upscaled(tile: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscale by a Kronecker product with a block of ones (independent of np.repeat)."""
    return np.kron(tile, np.ones((scale, scale, 1), np.uint8)).astype(np.uint8)


def test_to_uint8_maps_clips_and_rounds():
    x = np.array([-1.0, 1.0, 0.0, -3.0, 2.5, 10.4 / 127.5 - 1, 10.6 / 127.5 - 1])
    np.testing.assert_array_equal(viz.to_uint8(x), [0, 255, 128, 0, 255, 10, 11])
    assert viz.to_uint8(x).dtype == np.uint8
    already = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(viz.to_uint8(already), already)
    # A diverged sample is white, not black like a dark image (the cast made NaN 0).
    np.testing.assert_array_equal(viz.to_uint8(np.array([np.nan, np.inf, -np.inf])), [255, 255, 0])
    # Integer pixels in [0, 255] are not [-1, 1] floats: read as such they were all white.
    with pytest.raises(ValueError, match="cast integer pixels"):
        viz.to_uint8(already.astype(np.int64))
    np.testing.assert_array_equal(viz.to_uint8(np.asarray(x, ml_dtypes.bfloat16)), viz.to_uint8(
        np.asarray(x, ml_dtypes.bfloat16).astype(np.float32)))


def test_saving_diverged_samples_says_how_many(tmp_path, capsys):
    from configs.digits import get_config

    samples = np.zeros((300, 8, 8, 1), np.float32)
    samples[1, 3, 3] = np.nan
    samples[2] = np.inf
    samples[280] = np.nan  # past the 256 the grid shows: counted all the same
    path = str(tmp_path / "samples.png")
    generation.save_samples(get_config(), samples, path)
    samples[3, 0, 0] = -np.inf
    path = str(tmp_path / "samples.png")
    generation.save_samples(get_config(), samples, path)
    # The picture shows 3 of the 4 (the first 256), and -inf black, not white as the message had it.
    assert (f"warning: 4 of 300 samples hold NaN or inf (3 of them among the 256 in {path}, NaN and inf drawn "
            "white, -inf black)" in capsys.readouterr().err)
    grid = viz.image_grid(samples[:256], **generation._grid_style(get_config()))  # the first 256 only
    assert Image.open(path).size == (grid.shape[1], grid.shape[0])
    generation.save_samples(get_config(), samples[[0, 4]], path)
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("channels", [1, 3])
def test_image_grid_places_tiles_padding_and_scale(channels):
    num, height, width, scale, padding, pad_value = 5, 2, 3, 2, 1, 7
    values = 40 * (1 + np.arange(num * channels)).reshape(num, 1, 1, channels)  # distinct, never pad_value
    images = np.broadcast_to(values, (num, height, width, channels)).astype(np.uint8)
    grid = viz.image_grid(images, padding=padding, pad_value=pad_value, scale=scale)
    ncols, nrows = 3, 2  # ceil(sqrt(5)) columns
    tile_h, tile_w = height * scale, width * scale
    assert grid.shape == (nrows * (tile_h + padding) + padding, ncols * (tile_w + padding) + padding, channels)
    assert grid.dtype == np.uint8
    background = np.ones(grid.shape[:2], bool)
    for k in range(num):
        top = padding + (k // ncols) * (tile_h + padding)
        left = padding + (k % ncols) * (tile_w + padding)
        np.testing.assert_array_equal(grid[top : top + tile_h, left : left + tile_w], upscaled(images[k], scale))
        background[top : top + tile_h, left : left + tile_w] = False
    # Everything outside the tiles (padding and the empty sixth cell) is pad_value.
    assert (grid[background] == pad_value).all()


def test_image_grid_upscales_pixels_in_order_and_honours_ncols():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(4, 3, 2, 3)).astype(np.float32)
    grid = viz.image_grid(images, ncols=4, padding=0, scale=3)
    expected = np.concatenate([upscaled(viz.to_uint8(im), 3) for im in images], axis=1)
    np.testing.assert_array_equal(grid, expected)


def test_image_grid_rejects_bad_shapes():
    with pytest.raises(ValueError, match="C = 1 or 3"):
        viz.image_grid(np.zeros((2, 4, 4, 2)))
    with pytest.raises(ValueError, match="scale"):
        viz.image_grid(np.zeros((2, 4, 4, 1)), scale=0)
    with pytest.raises(ValueError, match="at least one image"):
        viz.image_grid(np.zeros((0, 4, 4, 1)))


def test_chain_strip_tile_at_row_i_col_j_is_record_j_of_example_i():
    rng = np.random.default_rng(1)
    records, num, height, width, scale, padding = 3, 4, 2, 3, 2, 1
    traj_x = rng.uniform(-1, 1, size=(records, num, height, width, 1))
    traj_pred_x0 = rng.uniform(-1, 1, size=traj_x.shape)
    timesteps = np.array([20, 10, 0])
    strip = viz.chain_strip(traj_x, traj_pred_x0, timesteps, num_examples=2, scale=scale, padding=padding)
    tile_h, tile_w = height * scale, width * scale
    block_h, block_w = 2 * (tile_h + padding) + padding, records * (tile_w + padding) + padding
    # Blocks are right-aligned after the name band; x_t on top, then a gap, then predicted x_0 at the bottom.
    left = strip.shape[1] - block_w
    block_tops = {"x": strip.shape[0] - 2 * block_h - viz._BLOCK_GAP, "pred": strip.shape[0] - block_h}
    for name, traj in (("x", traj_x), ("pred", traj_pred_x0)):
        for i in range(2):
            for j in range(records):
                top = block_tops[name] + padding + i * (tile_h + padding)
                col = left + padding + j * (tile_w + padding)
                tile = strip[top : top + tile_h, col : col + tile_w]
                np.testing.assert_array_equal(tile, upscaled(viz.to_uint8(traj[j, i]), scale))
    # The timestep header is a band of its own with text in it; without timesteps it is absent.
    unlabelled = viz.chain_strip(traj_x, traj_pred_x0, None, num_examples=2, scale=scale, padding=padding)
    assert strip.shape[0] - unlabelled.shape[0] == viz._LABEL_HEIGHT
    assert (strip[: viz._LABEL_HEIGHT, left:] < 128).any()


def test_interpolation_strip_rows_are_pairs_with_their_sources_at_the_ends():
    rng = np.random.default_rng(2)
    lambdas, pairs, height, width, scale, padding = 3, 2, 2, 3, 2, 1
    x0_a, x0_b = rng.uniform(-1, 1, (2, pairs, height, width, 1))
    decoded = rng.uniform(-1, 1, (lambdas, pairs, height, width, 1))
    strip = viz.interpolation_strip(x0_a, x0_b, decoded, [0, 0.5, 1], scale=scale, padding=padding)
    tile_h, tile_w = height * scale, width * scale
    columns = [x0_a, *decoded, x0_b]
    assert strip.shape[1] == (lambdas + 2) * (tile_w + padding) + padding
    for i in range(pairs):
        for j, column in enumerate(columns):
            top = viz._LABEL_HEIGHT + padding + i * (tile_h + padding)
            left = padding + j * (tile_w + padding)
            tile = strip[top : top + tile_h, left : left + tile_w]
            np.testing.assert_array_equal(tile, upscaled(viz.to_uint8(column[i]), scale))
    assert (strip[: viz._LABEL_HEIGHT] < 128).any()  # the lambdas written in the header


def test_latent_samples_grid_rows_are_image_and_step_with_source_latent_and_draws():
    rng = np.random.default_rng(3)
    steps, draws, images, height, width, scale, padding = 2, 3, 2, 2, 3, 2, 1
    x0 = rng.uniform(-1, 1, (images, height, width, 1))
    x_t = rng.uniform(-1, 1, (steps, images, height, width, 1))
    samples = rng.uniform(-1, 1, (steps, draws, images, height, width, 1))
    grid = viz.latent_samples_grid(x0, x_t, samples, [5, 50], scale=scale, padding=padding)
    tile_h, tile_w = height * scale, width * scale
    band = grid.shape[1] - ((draws + 2) * (tile_w + padding) + padding)  # the t labels on the left
    assert band > 0 and (grid[viz._LABEL_HEIGHT :, :band] < 128).any()
    for b in range(images):
        for i in range(steps):
            row = b * steps + i
            for j, tile_image in enumerate([x0[b], x_t[i, b], *samples[i, :, b]]):
                top = viz._LABEL_HEIGHT + padding + row * (tile_h + padding)
                left = band + padding + j * (tile_w + padding)
                tile = grid[top : top + tile_h, left : left + tile_w]
                np.testing.assert_array_equal(tile, upscaled(viz.to_uint8(tile_image), scale))


def test_save_chain_gif_has_one_frame_per_record_and_holds_the_last(tmp_path):
    records = 4
    # Distinct records: Pillow merges identical consecutive GIF frames.
    traj_x = np.linspace(-1, 1, records)[:, None, None, None, None] * np.ones((records, 3, 4, 4, 1))
    path = viz.save_chain_gif(
        tmp_path / "sub" / "chain.gif", traj_x, -traj_x, np.arange(records)[::-1], duration_ms=50, final_hold_ms=900
    )
    frames = viz.chain_frames(traj_x, -traj_x, np.arange(records)[::-1])
    with Image.open(path) as gif:
        assert gif.n_frames == records
        durations = []
        for r in range(records):
            gif.seek(r)
            durations.append(gif.info["duration"])
            # Grayscale GIF frames are lossless: the read-back frame is the computed one.
            np.testing.assert_array_equal(np.asarray(gif.convert("L")), frames[r][..., 0])
    assert durations == [50, 50, 50, 900]


def test_chain_pictures_convert_each_trajectory_once(monkeypatch):
    """chain_frames converted the whole predicted-x_0 trajectory once per frame: 100 records of 64 CIFAR-sized
    images took 25 s instead of 0.8 s. Only the examples shown are converted, once."""
    converted, to_uint8 = [], viz.to_uint8

    def counting(images):
        if np.asarray(images).dtype != np.uint8:
            converted.append(np.asarray(images).size)
        return to_uint8(images)

    monkeypatch.setattr(viz, "to_uint8", counting)
    records, shown = 6, 2
    traj_x = np.linspace(-1, 1, records * 5 * 4 * 4).reshape(records, 5, 4, 4, 1)
    for draw in (viz.chain_frames, viz.chain_strip):
        converted.clear()
        draw(traj_x, -traj_x, np.arange(records)[::-1], num_examples=shown)
        assert converted == [records * shown * 16] * 2
    # A predicted x_0 of another shape filled the wrong tiles (chain_strip) or raised an IndexError (chain_frames).
    for draw in (viz.chain_frames, viz.chain_strip):
        with pytest.raises(ValueError, match=r"traj_pred_x0 \(6, 4, 4, 4, 1\) must have the shape of traj_x"):
            draw(traj_x, -traj_x[:, :4])
    with pytest.raises(ValueError, match=r"a trajectory is \[records, examples, H, W, C\], got shape \(5, 4, 4, 1\)"):
        viz.chain_strip(traj_x[0])


def test_a_label_wider_than_its_panel_is_drawn_whole():
    """On one 8x8 digit (a 34-pixel panel) the frame's label "x_t, t=999" came out as "_t, t=999"."""
    timesteps = [999, 5]
    frames = viz.chain_frames(np.zeros((2, 1, 8, 8, 1)), None, timesteps)
    for frame, t in zip(frames, timesteps, strict=True):
        text = f"x_t, t={t}"
        alone = Image.new("L", (200, 40), 255)  # the text drawn alone on a wide canvas: its ink's width
        ImageDraw.Draw(alone).text((50, 5), text, fill=0, font=viz._FONT)
        expected = np.flatnonzero((np.asarray(alone) < 128).any(axis=0))
        inked = np.flatnonzero((frame[: viz._LABEL_HEIGHT, :, 0] < 128).any(axis=0))
        assert inked[0] > 0 and inked[-1] < frame.shape[1] - 1  # inside the picture
        assert inked[-1] - inked[0] == expected[-1] - expected[0]  # and as wide as the whole text


def test_pictures_refuse_input_they_would_draw_wrong(tmp_path):
    image = np.linspace(-1, 1, 16).reshape(4, 4, 1)
    # uint8 pixels in forward_process_strip were read as [-1, 1] floats: all white.
    schedule = dj.make_schedule_from_betas(np.linspace(0.01, 0.3, 25))
    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(viz.forward_process_strip(schedule, viz.to_uint8(image), key),
                                  viz.forward_process_strip(schedule, uint8_to_float(viz.to_uint8(image)), key))
    with pytest.raises(ValueError, match="images must be floats in \\[-1, 1\\] or uint8, got int64"):
        viz.forward_process_strip(schedule, viz.to_uint8(image).astype(np.int64), key)
    # save_png cast [-1, 1] floats to garbage.
    with pytest.raises(ValueError, match=r"save_png writes uint8 \[H, W, C\] pictures .* got float64 \(4, 4, 1\)"):
        viz.save_png(tmp_path / "x.png", image)
    assert not (tmp_path / "x.png").exists()
    # ncols=0 took the default layout; -1 a numpy error.
    for ncols in (0, -1):
        with pytest.raises(ValueError, match=f"scale and ncols must be >= 1 .* ncols={ncols}"):
            viz.image_grid(image[None], ncols=ncols)
    # [N, 3] points were drawn as scrambled pairs.
    with pytest.raises(ValueError, match=r"samples must be 2-D points \[..., 2\], got shape \(5, 3\)"):
        viz.scatter_plot(np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"data must be 2-D points"):
        viz.scatter_plot(np.zeros((5, 2)), np.zeros((6, 3)))


def colour_mask(image, colour):
    return (image == np.array(colour, np.uint8)).all(axis=-1)


def test_scatter_points_land_on_their_pixels_and_data_differs_in_colour():
    size = 101
    # Points outside the extent are dropped, also far ones (1e30 overflowed the pixel arithmetic).
    samples = np.array([[0.0, 0.0], [1.0, -1.0], [-0.5, 0.5], [np.nan, 0.0], [1.02, 0.0], [1e30, 3e18]])
    data = np.array([[0.5, 0.0]])
    image = viz.scatter_plot(samples, data, size=size, extent=(-1, 1, -1, 1), radius=0)
    assert image.dtype == np.uint8 and image.shape[-1] == 3
    assert viz.DATA_COLOR != viz.SAMPLE_COLOR
    header = image.shape[0] - size
    data_panel = image[header:, :size]
    sample_panel = image[header:, -size:]
    # (x, y) -> (column, row) = ((x + 1) / 2 * 100, (1 - y) / 2 * 100): y points up; the NaN point is dropped.
    assert list(zip(*np.nonzero(colour_mask(sample_panel, viz.SAMPLE_COLOR)), strict=True)) == [
        (25, 25),
        (50, 50),
        (100, 100),
    ]
    assert list(zip(*np.nonzero(colour_mask(data_panel, viz.DATA_COLOR)), strict=True)) == [(50, 75)]
    assert not colour_mask(image, viz.SAMPLE_COLOR)[:, : image.shape[1] - size].any()
    far = viz.scatter_plot(np.array([[1e30, 3e18], [-4.0, 0.0]]), size=size, extent=(-1, 1, -1, 1), radius=1)
    assert not colour_mask(far, viz.SAMPLE_COLOR).any()  # PIL raised on the overflowed pixel of 1e30


def test_scatter_default_extent_holds_all_points_with_equal_axis_scales():
    size = 200
    samples = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 5.0]])
    image = viz.scatter_plot(samples, size=size, radius=0, title="a title")
    rows, cols = np.nonzero(colour_mask(image, viz.SAMPLE_COLOR))
    assert len(rows) == 3
    assert abs(np.ptp(cols) - 2 * np.ptp(rows)) <= 1  # 10 units in x take twice the pixels of 5 units in y
    assert np.ptp(cols) > 0.8 * size  # the fitted extent is tight around the points


def test_scatter_extent_with_data_is_not_set_by_a_few_far_samples():
    # One diverged sample at 1e6 shrank the data panel of 200 points to one pixel.
    data = np.random.default_rng(3).normal(size=(200, 2))
    plain = viz.scatter_plot(data, data, size=100, radius=0)
    with_far = viz.scatter_plot(np.concatenate([data, [[1e6, 1e6]]]), data, size=100, radius=0)
    data_panel = lambda image: image[-100:, :100]  # noqa: E731
    np.testing.assert_array_equal(data_panel(with_far), data_panel(plain))
    assert colour_mask(data_panel(plain), viz.DATA_COLOR).sum() > 100
    # The samples' header says what is not drawn, so that the picture does not hide it.
    assert not np.array_equal(with_far[:-100, -100:], plain[:-100, -100:])
    np.testing.assert_array_equal(with_far[-100:, -100:], plain[-100:, -100:])


def test_scatter_trajectory_strip_has_one_panel_per_record():
    rng = np.random.default_rng(2)
    traj = rng.normal(size=(3, 50, 2)) * np.array([3.0, 2.0, 1.0])[:, None, None]
    strip = viz.scatter_trajectory_strip(traj, np.array([20, 10, 0]), size=60)
    assert strip.shape[1] == 3 * 60 + 2 * 8
    starts = [0, 68, 136]
    panels = [colour_mask(strip[:, s : s + 60], viz.SAMPLE_COLOR) for s in starts]
    # A shared extent: the shrinking cloud covers fewer pixels from record to record.
    spans = [np.ptp(np.nonzero(p)[1]) for p in panels]
    assert spans[0] > spans[1] > spans[2] > 0
    # One diverged chain of 500 (at 1e4 in every record) put the other 499 points of each panel in one pixel.
    traj = rng.normal(size=(3, 500, 2)) * np.array([3.0, 2.0, 1.0])[:, None, None]
    traj[:, 0] = 1e4
    strip = viz.scatter_trajectory_strip(traj, np.array([20, 10, 0]), size=60)
    panels = [colour_mask(strip[:, s : s + 60], viz.SAMPLE_COLOR) for s in starts]
    spans = [np.ptp(np.nonzero(p)[1]) for p in panels]
    assert spans[0] > spans[1] > spans[2] > 10 and panels[0].sum() > 200
    wild = viz.scatter_plot(traj[0], size=60, radius=0)  # the same without data beside the samples
    assert colour_mask(wild, viz.SAMPLE_COLOR).sum() > 200


def test_line_panel_draws_the_curve_on_its_axes():
    x = np.linspace(0.0, 1.0, 201)
    y = x**2
    y[50] = np.nan  # left out, not drawn as a spike
    rows, cols = np.nonzero(colour_mask(viz.line_panel(x, y, "title", "x"), viz.SAMPLE_COLOR))
    left, right, top, bottom = cols.min(), cols.max(), rows.min(), rows.max()
    assert right - left > 250 and bottom - top > 150
    assert rows[cols == left].max() >= bottom - 1 and rows[cols == right].min() <= top + 1  # from (0, 0) to (1, 1)
    for fraction in (0.25, 0.5, 0.75):  # y = x^2 on axes that span the data's range
        col = round(left + fraction * (right - left))
        expected_row = bottom - fraction**2 * (bottom - top)
        assert abs(rows[cols == col].mean() - expected_row) <= 2


def test_line_panel_ticks_integer_steps_with_integers(monkeypatch):
    """The reverse-steps axis of 1..40 was labelled 1, 20.5, 40."""
    ticks = []
    monkeypatch.setattr(viz, "_tick", lambda value: ticks.append(value) or f"{value:.4g}")
    viz.line_panel(np.arange(1, 41), np.linspace(0.5, 1.0, 40), "title", "steps")
    assert ticks == [1, 0.5, 20, 0.75, 40, 1.0]  # x and y of each of the three ticks


def test_rate_distortion_plot_has_the_papers_three_panels():
    steps = np.arange(1, 101)
    rate, distortion = np.linspace(0.0, 2.0, 100) ** 3, np.linspace(100.0, 1.0, 100)
    image = viz.rate_distortion_plot(steps, rate, distortion, title="a title")
    panels = np.array_split(np.arange(image.shape[1]), 3)
    curves = [np.nonzero(colour_mask(image[:, p], viz.SAMPLE_COLOR)) for p in panels]
    # Distortion falls with the steps, rate rises, and distortion falls with the rate.
    for (rows, cols), falls in zip(curves, (True, False, True), strict=True):
        left, right = rows[cols == cols.min()].mean(), rows[cols == cols.max()].mean()
        assert (left < right) if falls else (left > right)


def test_forward_process_strip_is_q_sample_with_one_shared_noise(tmp_path):
    betas = np.linspace(0.01, 0.3, 25)
    schedule = dj.make_schedule_from_betas(betas)
    rng = np.random.default_rng(3)
    image = rng.uniform(-1, 1, size=(1, 3, 2, 1))
    key = jax.random.PRNGKey(7)
    timesteps = [0, 5, 11]
    strip = viz.forward_process_strip(schedule, image, key, timesteps=timesteps, scale=2)
    noise = np.asarray(jax.random.normal(key, image.shape), np.float64)[0]
    abar = np.cumprod(1 - betas)
    tile_h, tile_w = 6, 4
    top = strip.shape[0] - (tile_h + 1)
    left = strip.shape[1] - (len(timesteps) * (tile_w + 1) + 1)
    for j, t in enumerate(timesteps):
        expected = viz.to_uint8(np.sqrt(abar[t]) * image[0] + np.sqrt(1 - abar[t]) * noise)  # Eq. 4, float64
        col = left + 1 + j * (tile_w + 1)
        tile = strip[top : top + tile_h, col : col + tile_w].astype(int)
        assert np.abs(tile - upscaled(expected, 2)).max() <= 1  # float32 vs float64 rounding at .5
    default = viz.save_forward_process(tmp_path / "fwd.png", schedule, image[0], key, scale=2)
    explicit = viz.forward_process_strip(schedule, image[0], key, timesteps=np.append(np.arange(0, 24, 2), 24), scale=2)
    np.testing.assert_array_equal(np.asarray(Image.open(default))[..., None], explicit)


def test_pictures_are_written_atomically(tmp_path, monkeypatch):
    # A kill while Pillow writes left a truncated samples.png, which a resumed run took as drawn.
    png, gif = tmp_path / "samples.png", tmp_path / "chain.gif"
    viz.save_png(png, np.zeros((4, 4, 3), np.uint8))
    viz.save_chain_gif(gif, np.zeros((2, 1, 4, 4, 1), np.float32))
    before = {path: path.read_bytes() for path in (png, gif)}

    def killed_while_saving(image, fp, *args, **kwargs):
        with open(fp, "wb") if isinstance(fp, str | os.PathLike) else fp as f:
            f.write(b"\x89PNG\r\n\x1a\n half a picture")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", killed_while_saving)
    with pytest.raises(KeyboardInterrupt):
        viz.save_png(png, np.full((4, 4, 3), 255, np.uint8))
    with pytest.raises(KeyboardInterrupt):
        viz.save_chain_gif(gif, np.ones((2, 1, 4, 4, 1), np.float32))
    assert {path: path.read_bytes() for path in (png, gif)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.gif", "samples.png"]
