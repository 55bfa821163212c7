"""Image helpers of the dashboards: RGBA packing, tiling, image figures and grids."""
import numpy as np
import pytest
from bokeh.models import ImageRGBA, Range1d, SaveTool

from custom_bokeh import images

BORDER = np.array(images.BORDER_COLOR, np.uint8)


def unpack(rgba):
    """uint32 (H, W) from to_rgba -> uint8 (H, W, 4), as the browser reads its bytes."""
    return rgba.view(np.uint8).reshape(rgba.shape + (4,))


def test_to_rgba_of_a_grey_image_flips_rows_for_bokeh():
    grey = np.array([[0, 10, 20], [30, 40, 50]], np.uint8)  # row 0 is the top row
    rgba = images.to_rgba(grey)
    assert rgba.dtype == np.uint32 and rgba.shape == (2, 3)
    pixels = unpack(rgba)
    # Bokeh draws row 0 at the bottom, so the image's bottom row comes first
    assert pixels[0, :, 0].tolist() == [30, 40, 50]
    assert pixels[1, :, 0].tolist() == [0, 10, 20]
    assert np.array_equal(pixels[..., 0], pixels[..., 1])
    assert np.array_equal(pixels[..., 0], pixels[..., 2])
    assert (pixels[..., 3] == 255).all()


def test_to_rgba_accepts_one_channel_and_rgb():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(images.to_rgba(grey[..., None]), images.to_rgba(grey))
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 1] = (200, 100, 50)  # top right
    pixels = unpack(images.to_rgba(rgb))
    assert pixels[1, 1].tolist() == [200, 100, 50, 255]
    assert pixels[0, 1].tolist() == [0, 0, 0, 255]


@pytest.mark.parametrize("array, message", [
    (np.zeros((4, 4), np.float32), "array must be a uint8 array (0..255), got dtype float32"),
    (np.zeros((4, 4, 2), np.uint8), "array must have shape (H, W), (H, W, 1) or (H, W, 3)"),
    (np.zeros(4, np.uint8), "array must have shape (H, W), (H, W, 1) or (H, W, 3), got (4,)"),
])
def test_to_rgba_names_the_problem(array, message):
    with pytest.raises(ValueError) as error:
        images.to_rgba(array)
    assert message in str(error.value)


def test_tile_places_maps_row_by_row_with_thin_borders():
    maps = np.stack([np.full((2, 3), 10 * (i + 1), np.uint8) for i in range(5)])
    sheet = images.tile(maps, columns=3)
    # 2 rows of 3 maps of 2x3 pixels, 1-pixel borders between and around
    assert sheet.shape == (2 * 3 + 1, 3 * 4 + 1, 3) and sheet.dtype == np.uint8
    for index in range(5):
        top, left = images.tile_origin(index, 3, 2, 3)
        assert (top, left) == (1 + 3 * (index // 3), 1 + 4 * (index % 3))
        assert (sheet[top:top + 2, left:left + 3] == 10 * (index + 1)).all()
    assert (sheet[0] == BORDER).all() and (sheet[:, 0] == BORDER).all()
    assert (sheet[3] == BORDER).all() and (sheet[:, 4] == BORDER).all()
    # the unused sixth cell is padding in the border colour
    assert (sheet[4:6, 9:12] == BORDER).all()


def test_tile_is_near_square_by_default_and_without_borders_when_asked():
    sheet = images.tile(np.zeros((32, 26, 26), np.uint8))
    assert sheet.shape == (6 * 27 + 1, 6 * 27 + 1, 3)  # 6 x 6 cells for 32 maps
    strip = images.tile(np.arange(10, dtype=np.uint8).reshape(10, 1, 1), columns=4, border=0)
    assert strip.shape == (3, 4, 3)
    assert strip[:, :, 0].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9] + [BORDER[0]] * 2]


def test_tile_keeps_rgb_maps():
    maps = np.zeros((2, 2, 2, 3), np.uint8)
    maps[1, ..., 2] = 255
    sheet = images.tile(maps, columns=2, border=0)
    assert sheet[0, 2:].tolist() == [[0, 0, 255]] * 2 and sheet[0, :2].tolist() == [[0, 0, 0]] * 2


@pytest.mark.parametrize("maps, kwargs, message", [
    (np.zeros((0, 2, 2), np.uint8), {},
     "maps must have shape (N, H, W) or (N, H, W, 3) with N >= 1"),
    (np.zeros((2, 2), np.uint8), {}, "maps must have shape (N, H, W)"),
    (np.zeros((2, 2, 2), np.int64), {}, "maps must be a uint8 array"),
    (np.zeros((2, 2, 2), np.uint8), {"columns": 0}, "columns must be a positive int, got 0"),
    (np.zeros((2, 2, 2), np.uint8), {"border": -1}, "border must be an int >= 0, got -1"),
])
def test_tile_names_the_problem(maps, kwargs, message):
    with pytest.raises(ValueError) as error:
        images.tile(maps, **kwargs)
    assert message in str(error.value)


def test_display_scale_gives_small_images_a_readable_integer_zoom():
    assert images.display_scale(28, 28) == 6  # 168 screen pixels
    assert images.display_scale(12, 12) == 15
    assert images.display_scale(224, 224) == 1
    assert images.display_scale(640, 900) == 1
    assert images.display_scale(1280, 900) == 0.5  # too large: shrunk into the box


def test_image_figure_shows_the_image_pixel_for_pixel_without_axes():
    image = np.random.default_rng(0).integers(0, 256, (28, 20, 1), dtype=np.uint8)
    plot = images.image_figure(image, "3")
    assert plot.title.text == "3"
    [renderer] = plot.renderers
    assert isinstance(renderer.glyph, ImageRGBA)
    assert np.array_equal(renderer.data_source.data["image"][0], images.to_rgba(image))
    glyph = renderer.glyph
    assert (glyph.x, glyph.y, glyph.dw, glyph.dh) == (0, 0, 20, 28)
    assert (plot.frame_width, plot.frame_height) == (20 * 6, 28 * 6)
    assert isinstance(plot.x_range, Range1d) and (plot.x_range.start, plot.x_range.end) == (0, 20)
    assert (plot.y_range.start, plot.y_range.end) == (0, 28)
    assert not any(axis.visible for axis in plot.axis)
    assert {type(t).__name__ for t in plot.toolbar.tools} == {
        "PanTool", "WheelZoomTool", "ResetTool", "SaveTool"}


def test_image_figure_subtitle_and_scale():
    plot = images.image_figure(np.zeros((4, 4), np.uint8), "u", scale=30, subtitle="act 1")
    assert plot.frame_width == 120
    assert [t.text for t in plot.above if hasattr(t, "text")] == ["act 1"]


def test_a_narrow_image_gets_room_for_its_whole_title_and_keeps_square_pixels():
    title = "Layer 8: out \u2014 3 units"
    plot = images.image_figure(np.zeros((1, 3), np.uint8), title, scale=40)
    needed = images.TOOLBAR_PIXELS + len(title) * images.TITLE_CHARACTER_PIXELS
    assert plot.frame_width >= needed > 3 * 40
    # the x range grows with the frame, so an image pixel stays 40 screen pixels wide
    assert plot.x_range.end == pytest.approx(3 * plot.frame_width / 120)
    image, outline = plot.renderers
    assert isinstance(image.glyph, ImageRGBA) and image.glyph.dw == 3
    assert (outline.glyph.left, outline.glyph.right, outline.glyph.top) == (0, 3, 1)


def test_image_grid_shares_ranges_of_equal_images_and_saves_as_one_file():
    figures = [images.image_figure(np.zeros(shape, np.uint8), str(i))
               for i, shape in enumerate([(28, 28), (28, 28, 1), (32, 32, 3)])]
    grid = images.image_grid(figures, columns=2, filename="sheet")
    assert figures[1].x_range is figures[0].x_range and figures[1].y_range is figures[0].y_range
    assert figures[2].x_range is not figures[0].x_range  # another size keeps its own ranges
    assert [(row, col) for _, row, col in grid.children] == [(0, 0), (0, 1), (1, 0)]
    # one save tool for the whole grid: Bokeh 3.9 exports the grid as one PNG
    [save] = [t for t in grid.toolbar.tools if isinstance(t, SaveTool)]
    assert save.filename == "sheet"
