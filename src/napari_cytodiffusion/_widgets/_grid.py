"""Showing sets of single cells beside the smear instead of on top of it.

A stack of cells added as an image stack sits on the smear's top-left corner at its own pixel
size and adds a slider to the whole viewer. Instead the cells are tiled into one 2D grid image
placed to the right of everything already in the viewer, at the smear's scale when it is
known (a model crop spans ``FIELD_OF_VIEW_RBC`` red-cell diameters), with a Labels layer of
the tiles whose features (class, seed, ...) show on hover. The grid's metadata keeps its
layout, so the cells can be cut out again (:func:`layer_cells`).
"""

import numpy as np

from napari_cytodiffusion._widgets._common import (
    added_unselected,
    camera,
    full_resolution,
    layer_id,
)

GAP = 4  # pixels between tiles, in crop pixels
MARGIN = 0.05  # space between the grid and what is already shown, as a fraction of its width


def tile(images, columns=None, gap=GAP):
    """Tile ``images`` (n, size, size, 3), float in [0, 1] or integer, row by row.

    Returns
    -------
    grid : ndarray (rows, cols, 3)
        White between tiles.
    tiles : ndarray int32 (rows, cols)
        Tile ``i`` (0-based) holds ``i + 1``; 0 between tiles.
    layout : dict
        ``columns``, ``size``, ``gap`` and ``count``, for :func:`untile`.
    """
    images = np.asarray(images)
    count, size = len(images), images.shape[1]
    columns = columns or int(np.ceil(np.sqrt(count)))
    layout = {"columns": columns, "size": size, "gap": gap, "count": count}
    rows, step = -(-count // columns), size + gap
    white = np.iinfo(images.dtype).max if images.dtype.kind in "ui" else 1
    grid = np.full((rows * step - gap, columns * step - gap, images.shape[-1]), white, images.dtype)
    tiles = np.zeros(grid.shape[:2], np.int32)
    for i, image in enumerate(images):
        r, c = tile_origin(layout, i)
        grid[r : r + size, c : c + size] = image
        tiles[r : r + size, c : c + size] = i + 1
    return grid, tiles, layout


def tile_origin(layout, index):
    """(row, col) of the top-left pixel of tile ``index`` (0-based) in its grid."""
    r, c = divmod(index, layout["columns"])
    step = layout["size"] + layout["gap"]
    return r * step, c * step


def untile(grid, layout):
    """The images of a grid made by :func:`tile`, as a stack (n, size, size, channels)."""
    size = layout["size"]
    origins = [tile_origin(layout, i) for i in range(layout["count"])]
    return np.stack([grid[r : r + size, c : c + size] for r, c in origins])


def layer_cells(layer):
    """The single cells an image layer holds: a grid's tiles, a stack's planes, or the image."""
    data = np.asarray(full_resolution(layer))
    if "grid" in layer.metadata:
        return untile(data, layer.metadata["grid"])
    return data[None] if layer.ndim == 2 else data


def by_cell(table):
    """A set of cells' feature ``table`` indexed by cell, in its order: row ``i`` is cell ``i``
    of :func:`layer_cells`, tile ``i + 1`` of the tiles layer (its label value), whatever the
    table's own ``index`` column counts from (Generate's from 0, Classify cell images' from
    1)."""
    return table.reset_index(drop=True)


def beside(viewer, size):
    """(scale, translate) for a grid of ``size``-px crops right of everything shown.

    The crops get the smear's scale when a layer's metadata gives its red-cell diameter (as
    Segment cells' and Classify cells' layers do), else one world unit per crop pixel.
    """
    from napari_cytodiffusion.core.smear.crops import FIELD_OF_VIEW_RBC

    scale = 1.0
    for layer in viewer.layers:
        diameter = layer.metadata.get("rbc_diameter")
        if diameter:
            scale = FIELD_OF_VIEW_RBC * float(diameter) * float(layer.scale[-1]) / size
            break
    if len(viewer.layers) == 0:
        return (scale, scale), (0.0, 0.0)
    low, high = np.asarray(viewer.layers.extent.world)[:, -2:]
    width = high[1] - low[1]
    return (scale, scale), (float(low[0]), float(high[1] + MARGIN * max(width, 1.0)))


def add_grid(viewer, tiled, name, features, metadata=None):
    """Add a grid made by :func:`tile` (in the worker: it copies every cell) beside what is
    shown; ``features`` (one row per cell) go in its metadata. Returns the layer."""
    grid, _, layout = tiled
    scale, translate = beside(viewer, layout["size"])
    with added_unselected(viewer):  # its tiles layer is the one selected
        return viewer.add_image(
            grid,
            rgb=True,
            name=name,
            metadata={**(metadata or {}), "features": features, "grid": layout},
            scale=scale,
            translate=translate,
        )


def add_tiles(viewer, grid_layer, tiled, features, colormap=None, contour=1):
    """Add the tiles layer of a grid on top of it, hidden and not selected: hovering a cell
    shows its ``features`` once it is selected. Show and select it in the next turn of the
    event loop (``select_then_show``), so that napari's work of adding it and its first draw are
    two stalls instead of one (see ``update_or_add_in_steps``).

    The tiles are outlined ``contour`` crop pixels wide, in ``colormap``'s colour of each
    tile number where given (napari's label colours otherwise)."""
    # Labels features are keyed by label value in "index": the tile number, 1 up.
    table = features.rename(columns={"index": "cell"})
    table.insert(0, "index", np.arange(1, len(table) + 1))
    with added_unselected(viewer):
        tiles_layer = viewer.add_labels(
            tiled[1],
            name=f"{grid_layer.name} tiles",
            features=table,
            opacity=0.4 if colormap is None else 1.0,
            # Which grid they number, whatever it is renamed to (see _common.made_for).
            metadata={"tiles": grid_layer.name, "image_id": layer_id(grid_layer)},
            **({} if colormap is None else {"colormap": colormap}),
            scale=grid_layer.scale,
            translate=grid_layer.translate,
            visible=False,
        )
    tiles_layer.contour = contour  # outline the tiles; the cells stay visible
    removed_with(viewer, grid_layer, tiles_layer)
    return tiles_layer


def removed_with(viewer, grid_layer, layer):
    """``layer`` drawn over a grid (its tiles, its review rings) goes when the grid is
    removed: outlines and rings of nothing would stay behind."""

    def removed(event):
        if event.value is grid_layer and layer in viewer.layers:
            viewer.layers.remove(layer)
        if event.value in (grid_layer, layer):
            viewer.layers.events.removed.disconnect(removed)  # and lets the layers go

    viewer.layers.events.removed.connect(removed)


def focus(viewer, layer):
    """Centre the camera on a 2D ``layer`` and zoom so that it fills the canvas.

    (``viewer.fit_to_view(layers=...)`` fails when another layer has more dimensions.)
    """
    (top, left), (bottom, right) = np.asarray(layer.extent.world)[:, -2:]
    canvas = getattr(viewer, "canvas", None)  # napari >= 0.9; older ones keep it private
    height, width = canvas.size if canvas is not None else viewer._canvas_size
    view = camera(viewer)
    view.center = ((top + bottom) / 2, (left + right) / 2)
    view.zoom = 0.95 * min(height / (bottom - top), width / (right - left))
