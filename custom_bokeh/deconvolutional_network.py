"""Deconvolutional network dashboard: the input image and one reconstruction per feature map.

All images sit in one ``gridplot`` with shared ranges, so panning or zooming one
moves all of them to the same region. Bokeh 3.9 merges the grid's save tools
into one SaveTool that belongs to the grid, and that tool exports the whole
grid as one PNG: the download holds every reconstruction with its title.
"""
from custom_bokeh import images
from custom_bokeh.dashboard import image_dashboard
from custom_keras import registry

TECHNIQUE = registry.get("deconvolutional_network")


def render(result, info, input_image, image_name):
    """The layout of one deconvolutional network snapshot.

    Args:
        result: [(uint8 (H, W, C) reconstruction, layer name, feature map no), ...]
            (Appendix D.4).
        info: unused; this technique records no per-image info.
        input_image: uint8 (H, W, C) image as fed to the model, or None.
        image_name: the visualization image's file name.
    """
    if not isinstance(result, (list, tuple)) or not result:
        raise ValueError("deconvolutional network results must be a non-empty list of "
                         "(image, layer name, feature map no) tuples, got %r" % (result,))
    figures = []
    if input_image is not None:
        figures.append(images.image_figure(input_image, "Input: %s" % image_name))
    for position, entry in enumerate(result):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
            raise ValueError("deconvolutional network entry %d must be an (image, layer name, "
                             "feature map no) tuple, got %r" % (position, entry))
        reconstruction, layer_name, feature_map_no = entry
        figures.append(images.image_figure(reconstruction,
                                           "#%s in %s" % (feature_map_no, layer_name)))
    return images.image_grid(figures, filename=TECHNIQUE.key)



def make_document(doc):
    """The deconvolutional network app of the Bokeh server."""
    image_dashboard(doc, TECHNIQUE, render)
