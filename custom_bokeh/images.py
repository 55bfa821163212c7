"""Showing uint8 images in Bokeh: RGBA packing, tiling many maps into one image, image figures.

Bokeh's ``image_rgba`` draws row 0 of its array at the bottom, while images and
feature maps store row 0 at the top, so ``to_rgba`` flips rows. Many feature
maps are tiled into ONE image (``tile``) so that a layer of 512 filters costs
one glyph in the browser, not 512 figures. This module imports no keras.
"""
import math

import numpy as np
from bokeh.layouts import gridplot
from bokeh.models import Range1d, SaveTool, Title
from bokeh.plotting import figure

# The colour of the thin lines between tiles and of unused grid cells: a blue grey that
# stands apart from the grey values of the maps and from the white page.
BORDER_COLOR = (148, 163, 184)
TITLE_STYLE = {"text_font_size": "13px", "text_color": "#1f2933", "text_font_style": "bold"}
SUBTITLE_STYLE = {"text_font_size": "12px", "text_color": "#3e4c59", "text_font_style": "normal"}
IMAGE_TOOLS = "pan,wheel_zoom,reset,save"
GRID_COLUMNS = 4
OUTLINE_COLOR = "#9aa5b1"
# screen pixels per character of a title (13 px bold) and a subtitle (12 px), a little generous,
# and the room the toolbar takes beside the title (up to 5 tools, a hover tool included)
TITLE_CHARACTER_PIXELS, SUBTITLE_CHARACTER_PIXELS, TOOLBAR_PIXELS = 8, 7, 60


def _check_uint8(array, argument):
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError("%s must be a uint8 array (0..255), got dtype %s"
                         % (argument, array.dtype))
    return array


def as_rgb(array, argument="array"):
    """A uint8 image (H, W), (H, W, 1) or (H, W, 3) as uint8 (H, W, 3).

    Args:
        array: the image, row 0 at the top.
        argument: the name used in error messages.
    """
    array = _check_uint8(array, argument)
    if array.ndim == 3 and array.shape[2] in (1, 3):
        return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    raise ValueError("%s must have shape (H, W), (H, W, 1) or (H, W, 3), got %s"
                     % (argument, array.shape))


def to_rgba(array):
    """Packs a uint8 image into the uint32 (H, W) array that Bokeh's ``image_rgba`` draws.

    Args:
        array: uint8 (H, W), (H, W, 1) (grey) or (H, W, 3) (RGB), row 0 at the top.

    Returns:
        uint32 (H, W), rows flipped so that the image appears upright; each
        value holds the bytes R, G, B, A (A = 255) in memory order.
    """
    rgb = as_rgb(array)
    height, width = rgb.shape[:2]
    rgba = np.empty((height, width, 4), dtype=np.uint8)
    rgba[:, :, :3] = rgb[::-1]
    rgba[:, :, 3] = 255
    return rgba.view(np.uint32).reshape(height, width)


def grid_columns(count, height=1, width=1, aspect=1.0):
    """How many columns make a grid of ``count`` cells about ``aspect`` times wider than high.

    Args:
        count: number of cells.
        height, width: size of one cell in pixels.
        aspect: wanted grid width / grid height (1 = near-square).
    """
    return max(1, min(count, math.ceil(math.sqrt(count * aspect * height / width))))


def tile(maps, columns=None, border=1, border_color=BORDER_COLOR):
    """Tiles N equally sized maps into one RGB image, row by row, separated by thin borders.

    Args:
        maps: uint8 (N, H, W) grey maps or (N, H, W, 3) RGB maps.
        columns: maps per row; None makes the grid near-square.
        border: border width in pixels, between maps and around the grid.
        border_color: RGB of the borders and of unused cells in the last row.

    Returns:
        uint8 (rows * (H + border) + border, columns * (W + border) + border, 3),
        row 0 at the top; map i sits in grid row i // columns, column i % columns.
    """
    maps = _check_uint8(maps, "maps")
    if maps.ndim == 3:
        maps = np.repeat(maps[..., None], 3, axis=3)
    if maps.ndim != 4 or maps.shape[3] != 3 or maps.shape[0] == 0:
        raise ValueError("maps must have shape (N, H, W) or (N, H, W, 3) with N >= 1, got %s"
                         % (maps.shape,))
    count, height, width = maps.shape[:3]
    if columns is None:
        columns = grid_columns(count, height, width)
    if not isinstance(columns, (int, np.integer)) or columns < 1:
        raise ValueError("columns must be a positive int, got %r" % (columns,))
    if not isinstance(border, (int, np.integer)) or border < 0:
        raise ValueError("border must be an int >= 0, got %r" % (border,))
    columns = min(int(columns), count)
    rows = math.ceil(count / columns)
    sheet = np.empty((rows * (height + border) + border, columns * (width + border) + border, 3),
                     dtype=np.uint8)
    sheet[:] = np.asarray(border_color, dtype=np.uint8)
    for index in range(count):
        top, left = tile_origin(index, columns, height, width, border)
        sheet[top:top + height, left:left + width] = maps[index]
    return sheet


def tile_origin(index, columns, height, width, border=1):
    """(top, left) pixel of map ``index`` in a sheet made by ``tile``."""
    row, column = divmod(index, columns)
    return border + row * (height + border), border + column * (width + border)


def display_scale(height, width, target=180, max_width=900, max_height=640):
    """Screen pixels per image pixel: an integer (crisp pixels) near ``target`` screen pixels.

    A 28x28 image gets 6 (168 px); a larger one gets less, down to 1; one larger
    than ``max_width`` x ``max_height`` gets the fraction that fits it into that box.

    Args:
        height, width: the image size in pixels.
        target: wanted screen size of the longer side.
        max_width, max_height: the box the image should fit.
    """
    fit = min(max_width / width, max_height / height)
    if fit < 1:
        return fit
    return max(1, min(target // max(height, width), int(fit)))


def title_room(title, subtitle=None):
    """Screen pixels a figure's frame needs so that Bokeh does not cut its title or subtitle."""
    return max(TOOLBAR_PIXELS + len(title) * TITLE_CHARACTER_PIXELS,
               len(subtitle or "") * SUBTITLE_CHARACTER_PIXELS)


def image_figure(array, title, scale=None, tools=IMAGE_TOOLS, subtitle=None, min_frame_width=0):
    """A figure that shows one uint8 image at an integer zoom, with no axes or grid.

    Args:
        array: uint8 (H, W), (H, W, 1) or (H, W, 3), row 0 at the top.
        title: the figure title.
        scale: screen pixels per image pixel (below 1 shrinks a large image); None
            picks one (a 28x28 image -> 168 px).
        tools: Bokeh tools (pan, wheel zoom, reset and save by default).
        subtitle: an optional second title line (e.g. "activation 12.3").
        min_frame_width: the frame is at least this wide (figures of a grid pass their
            widest ``title_room``, so that equal images keep equal frames).

    Returns:
        the figure; its image glyph is ``figure.renderers[0]``, drawn over
        x in [0, W], y in [0, H] (data units are image pixels).
    """
    rgba = to_rgba(array)
    height, width = rgba.shape
    scale = scale or display_scale(height, width)
    image_width = max(1, round(width * scale))
    # Bokeh cuts a title at the frame's width: a narrow image (a dense layer of 3 units)
    # gets a wider frame, the image at its left and blank room at its right
    frame_width = max(image_width, title_room(title, subtitle), min_frame_width)
    x_end = width * frame_width / image_width
    plot = figure(title=title, tools=tools, frame_width=frame_width,
                  frame_height=max(1, round(height * scale)),
                  x_range=Range1d(0, x_end, bounds=(0, x_end)),
                  y_range=Range1d(0, height, bounds=(0, height)),
                  toolbar_location="above", min_border=4,
                  outline_line_color=OUTLINE_COLOR if frame_width == image_width else None)
    plot.toolbar.logo = None
    plot.toolbar.autohide = True
    plot.axis.visible = False
    plot.grid.visible = False
    for name, value in TITLE_STYLE.items():
        setattr(plot.title, name, value)
    if subtitle:
        plot.add_layout(Title(text=subtitle, **SUBTITLE_STYLE), "above")
    plot.image_rgba(image=[rgba], x=0, y=0, dw=width, dh=height)
    if frame_width > image_width:  # the outline goes round the image, not the blank room
        plot.quad(left=0, right=width, bottom=0, top=height, fill_alpha=0,
                  line_color=OUTLINE_COLOR)
    return plot


def image_grid(figures, columns=GRID_COLUMNS, filename=None):
    """Figures in a grid with one toolbar; figures of equal image and frame size share pan and zoom.

    Bokeh 3.9 merges the figures' save tools into one SaveTool of the grid, which
    exports the whole grid, titles included, as one PNG.

    Args:
        figures: figures made by ``image_figure``.
        columns: figures per row.
        filename: the download's file name without ".png"; None asks the user.
    """
    shapes = [plot.renderers[0].data_source.data["image"][0].shape for plot in figures]
    for plot, shape in zip(figures[1:], shapes[1:]):
        # the same image size in a frame of the same width (a long title widens a frame)
        if shape == shapes[0] and plot.frame_width == figures[0].frame_width:
            plot.x_range, plot.y_range = figures[0].x_range, figures[0].y_range
    grid = gridplot(figures, ncols=columns, toolbar_location="above",
                    toolbar_options={"logo": None})
    for tool in grid.toolbar.tools:
        if isinstance(tool, SaveTool):
            tool.filename = filename
    return grid
