"""Is the cell too large for the class it was called? A check on the call that needs no model.

A crop spans a fixed number of red-cell diameters, so the area of its central cell's
chromatin, in red-cell areas, is a physical size: half of PBC's platelets cover 0.5-0.8 red
cells, half of its lymphocytes 2.0-2.7 and of its monocytes 3.9-4.7. When an image is unlike
the training images (defocus, heavy JPEG, another stain), the denoisers of the smooth, small
classes explain a large cell best and it is called a platelet with confidence; its size still
says it is not one (``benchmarks/cell_size.py``). The check is one-sided: a pale stain can
hide chromatin and make a cell look small, but nothing makes a platelet look like three red
cells of chromatin.

The largest area of each class on PBC **train** cells (the ``1 - FALSE_ALARM`` quantile),
times ``SCALE_TOLERANCE`` for red-cell scale estimates up to 12 % off, is stored in the
model's calibration (``calibration["size"]``); a call above its class's bound is *too large
for its class*.
"""

import numpy as np

from napari_cytodiffusion.core.smear.crops import FIELD_OF_VIEW_RBC
from napari_cytodiffusion.core.smear.stain import nucleus_mask, optical_density

# Share of training cells of a class above its bound (before the tolerance).
FALSE_ALARM = 0.002
# Area factor for a red-cell scale estimated 12 % small (1.12 squared, rounded up).
SCALE_TOLERANCE = 1.25
# Chromatin within this many red-cell diameters of the central cell's counts as its own
# (the lobes of a neutrophil), as the central-cell locator groups them.
GROUPING_RBC = 1 / 3
# Share of a crop's pixels brighter than its background estimate.
BACKGROUND_QUANTILE = 0.95


def central_chromatin_area(crops, field_of_view=FIELD_OF_VIEW_RBC):
    """Chromatin area of the cell at the centre of each normalised crop, in red-cell areas
    (n,); 0 where nothing is stained.

    Examples
    --------
    >>> crop = np.ones((1, 64, 64, 3), np.float32)
    >>> yy, xx = np.mgrid[:64, :64]
    >>> crop[0, (yy - 32) ** 2 + (xx - 32) ** 2 < 13**2] = (0.45, 0.25, 0.6)  # a purple nucleus
    >>> float(central_chromatin_area(crop)[0].round(1))  # 13 px of the 25.6 px red-cell radius
    1.0
    """
    from scipy import ndimage as ndi

    crops = np.asarray(crops, np.float32)
    rbc_px = crops.shape[1] / field_of_view
    red_cell_area = np.pi / 4 * rbc_px**2
    reach = max(1, int(GROUPING_RBC * rbc_px))
    centre = (np.array(crops.shape[1:3], float) - 1) / 2
    areas = np.zeros(len(crops))
    for i, crop in enumerate(crops):
        background = np.quantile(crop.reshape(-1, 3), BACKGROUND_QUANTILE, axis=0)
        chromatin = nucleus_mask(optical_density(crop, background))
        if chromatin.sum() < 3:
            continue
        groups, count = ndi.label(ndi.binary_dilation(chromatin, iterations=reach))
        groups[~chromatin] = 0
        index = np.arange(1, count + 1)
        centroids = np.array(ndi.center_of_mass(chromatin, groups, index)).reshape(-1, 2)
        nearest = index[np.argmin(((centroids - centre) ** 2).sum(axis=1))]
        areas[i] = np.sum(groups == nearest) / red_cell_area
    return areas


def fit_size_reference(areas, labels, classes):
    """The largest chromatin area each class may have: the ``1 - FALSE_ALARM`` quantile of
    its training cells' (:func:`central_chromatin_area`) times ``SCALE_TOLERANCE``.

    Returns
    -------
    dict
        JSON-ready; the model's ``calibration["size"]``: ``{"largest": {class: area}}``.
    """
    areas, labels = np.asarray(areas, float), np.asarray(labels)
    largest = {
        name: round(float(np.quantile(areas[labels == name], 1 - FALSE_ALARM)) * SCALE_TOLERANCE, 4)
        for name in classes
        if np.any(labels == name)
    }
    return {"largest": largest, "false_alarm": FALSE_ALARM, "scale_tolerance": SCALE_TOLERANCE}


def size_ratios(reference, areas, called):
    """Each cell's chromatin area over the largest its called class may have (n,): above 1 is
    too large for its class; NaN for a class without a bound (a lab's new class) or without a
    reference."""
    largest = (reference or {}).get("largest", {})
    bounds = np.array([largest.get(name, np.nan) for name in called], float)
    return np.asarray(areas, float) / bounds
