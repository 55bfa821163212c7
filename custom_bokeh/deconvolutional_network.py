"""Deconvolutional network dashboard: the input and one reconstruction per feature map.

For a sequence model the input and each (T, C) reconstruction are curves per
channel over time, one chart each, in a column. For images:

All images sit in one ``gridplot`` with shared ranges, so panning or zooming one
moves all of them to the same region. Bokeh 3.9 merges the grid's save tools
into one SaveTool that belongs to the grid, and that tool exports the whole
grid as one PNG: the download holds every reconstruction with its title.
"""
from bokeh.layouts import column

from custom_bokeh import charts, images
from custom_keras import registry

TECHNIQUE = registry.get("deconvolutional_network")


def render(result, info, input_image, image_name):
    """The layout of one deconvolutional network snapshot.

    Args:
        result: [(uint8 (H, W, C) reconstruction, layer name, feature map no), ...]
            (Appendix D.4); a sequence model's reconstructions are float (T, C).
        info: unused; this technique records no per-image info.
        input_image: uint8 (H, W, C) image as fed to the model, or None.
        image_name: the visualization image's file name.
    """
    if not isinstance(result, (list, tuple)) or not result:
        raise ValueError("deconvolutional network results must be a non-empty list of "
                         "(image, layer name, feature map no) tuples, got %r" % (result,))
    for position, entry in enumerate(result):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
            raise ValueError("deconvolutional network entry %d must be an (image, layer name, "
                             "feature map no) tuple, got %r" % (position, entry))
    if charts.input_kind_of(result[0][0]):
        figures = [charts.input_figure(input_image, image_name)] \
            if charts.input_kind_of(input_image) else []
        figures += [charts.result_figure(reconstruction, "Feature map #%s in %s, reconstructed"
                                         % (feature_map_no, layer_name), y_label="reconstruction")
                    for reconstruction, layer_name, feature_map_no in result]
        return column(*figures, spacing=12)
    shown = [(reconstruction, "#%s in %s" % (feature_map_no, layer_name))
             for reconstruction, layer_name, feature_map_no in result]
    if input_image is not None:
        shown.insert(0, (input_image, "Input: %s" % image_name))
    # one frame width for all: room for the longest title, and equal images share pan and zoom
    width = max(images.title_room(title) for _, title in shown)
    return images.image_grid([images.image_figure(image, title, min_frame_width=width)
                              for image, title in shown], filename=TECHNIQUE.key)
