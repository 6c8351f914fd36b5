"""Resampling an image to a given scale, the same way for training and for use.

The white-cell detector sees every smear at one scale (a red cell ``DETECTOR_RBC`` pixels
across). Images are shrunk by integer block means first (exact, cheap, no aliasing) and by
bilinear interpolation for the rest, so a field looks the same to the detector whatever its
magnification; the detector's training crops are made with these same functions.
"""

import numpy as np
from scipy import ndimage as ndi


def block_mean(image, factor):
    """``image`` (rows, cols, ...) shrunk by an integer ``factor``; edge blocks are partial."""
    factor = int(factor)
    if factor <= 1:
        return np.asarray(image, np.float32)
    rows, cols = image.shape[:2]
    pad_r, pad_c = -rows % factor, -cols % factor
    pad = ((0, pad_r), (0, pad_c)) + ((0, 0),) * (image.ndim - 2)
    sums = np.pad(np.asarray(image, np.float32), pad)
    counts = np.pad(np.ones((rows, cols), np.float32), pad[:2])
    shape = (sums.shape[0] // factor, factor, sums.shape[1] // factor, factor)
    total = sums.reshape(shape + image.shape[2:]).sum(axis=(1, 3))
    count = counts.reshape(shape).sum(axis=(1, 3))
    return total / count.reshape(count.shape + (1,) * (image.ndim - 2))


def resize(image, shape):
    """Bilinear resampling of ``image`` (rows, cols, ...) to ``shape`` (rows, cols).

    Pixel centres map onto pixel centres (``grid_mode``), so up- and down-sampling by the
    same factor line up.
    """
    image = np.asarray(image, np.float32)
    if tuple(image.shape[:2]) == tuple(shape):
        return image
    zoom = (shape[0] / image.shape[0], shape[1] / image.shape[1]) + (1,) * (image.ndim - 2)
    out = ndi.zoom(image, zoom, order=1, mode="nearest", grid_mode=True, prefilter=False)
    return out[: shape[0], : shape[1]]


def rescale(image, zoom):
    """``image`` at ``zoom`` times its size: block means, then bilinear for the rest."""
    shape = scaled_shape(image.shape[:2], zoom)
    factor = max(1, int(1 / zoom)) if zoom < 1 else 1
    return resize(block_mean(image, factor), shape)


def scaled_shape(shape, zoom):
    """(rows, cols) of an image of ``shape`` at ``zoom`` times its size (at least 1 x 1)."""
    return tuple(max(1, int(round(n * zoom))) for n in shape[:2])


def scaled_boxes(boxes, zoom):
    """Boxes ``[min_row, min_col, max_row, max_col]`` in the coordinates of a rescaled image."""
    return np.asarray(boxes, np.float64).reshape(-1, 4) * zoom
