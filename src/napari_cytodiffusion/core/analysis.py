"""Classifying the white cells of an image: segmentation or central-cell location, crops,
diffusion classification, and the per-cell table every face of the plugin shows.
"""

from dataclasses import dataclass

import numpy as np

from napari_cytodiffusion.core.classify import classify_crops

# Share of the progress bar given to segmentation; classification takes the rest.
_SEGMENTATION_SHARE = 0.15


@dataclass
class ImageClassification:
    """The white cells of one image and their calls.

    Attributes
    ----------
    calls : list of CellCall
    cell_ids : list of int or None
        Label value of each call's cell in ``segmentation.wbc_labels``; None for a
        single-cell image.
    centres : ndarray (n, 2)
        (row, col) centre of each classified cell in the image.
    crops : ndarray (n, size, size, 3)
        What the model saw.
    rbc_diameter : float
        The scale used for the crops, in pixels.
    segmentation : SmearSegmentation or None
    """

    calls: list
    cell_ids: list
    centres: np.ndarray
    crops: np.ndarray
    rbc_diameter: float
    segmentation: object = None

    def table(self):
        """One row per cell: see :func:`calls_table`."""
        return calls_table(self.calls, self.cell_ids, self.centres)


def classify_image(
    image,
    model,
    segment=True,
    segmentation=None,
    labels=None,
    rbc_diameter=None,
    strategy="adaptive",
    seed=0,
    uncertainty_threshold=None,
    anomaly_threshold=None,
    progress=None,
):
    """Classify every white cell of a smear, or the central cell of a single-cell image.

    Parameters
    ----------
    image : array-like
        RGB(A) image of any dtype.
    model : DiffusionModel
    segment : bool
        True for a smear field (every white cell is found and classified), False for a
        single-cell image (PBC / CellaVision style: the cell nearest the centre).
    segmentation : SmearSegmentation, optional
        Reuse an existing segmentation of ``image`` instead of segmenting again.
    labels : ndarray, optional
        Instance labels of the white cells to classify (for example edited by the user);
        each label is cut out around its centroid. Overrides ``segment``.
    rbc_diameter : float, optional
        Red-cell diameter in pixels; estimated from the image when not given.
    progress : callable, optional
        ``progress(done, total)``; raise ``Cancelled`` from it to stop.

    Returns
    -------
    ImageClassification
    """
    from napari_cytodiffusion.core.crops import crop_cell, locate_central_cell
    from napari_cytodiffusion.core.image import to_rgb_float
    from napari_cytodiffusion.core.scale import background_colour, estimate_rbc_diameter

    rgb = to_rgb_float(image)
    size = model.image_size
    start = 0.0  # where classification begins on the progress bar
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != rgb.shape[:2]:
            raise ValueError(
                f"The labels ({labels.shape}) do not match the image ({rgb.shape[:2]}); "
                "choose the labels layer made for this image."
            )
        from scipy import ndimage as ndi

        cell_ids = [int(v) for v in np.unique(labels) if v != 0]
        centres = np.array(ndi.center_of_mass(labels > 0, labels, cell_ids)).reshape(-1, 2)
        scale = rbc_diameter or estimate_rbc_diameter(rgb)
        background = background_colour(rgb)
    elif segment or segmentation is not None:
        if segmentation is None:
            from napari_cytodiffusion.core.segmentation import segment_smear

            segmentation = segment_smear(
                rgb, rbc_diameter, progress=_phase(progress, 0.0, _SEGMENTATION_SHARE)
            )
            start = _SEGMENTATION_SHARE
        wbc = segmentation.table("wbc")
        cell_ids = wbc["index"].astype(int).tolist()
        centres = wbc[["centroid_row", "centroid_col"]].to_numpy(float).reshape(-1, 2)
        scale, background = segmentation.rbc_diameter, segmentation.background
    else:
        scale = rbc_diameter or estimate_rbc_diameter(rgb)
        background = background_colour(rgb)
        cell_ids = [None]
        centres = np.array([locate_central_cell(rgb, scale, background)])
    crops = np.zeros((len(centres), size, size, 3), np.float32)
    for i, centre in enumerate(centres):
        crops[i] = crop_cell(rgb, centre, scale, size, background=background)
    calls = []
    if len(crops):
        calls = classify_crops(
            model,
            crops,
            strategy=strategy,
            seed=seed,
            uncertainty_threshold=uncertainty_threshold,
            anomaly_threshold=anomaly_threshold,
            progress=_phase(progress, start, 1.0),
        )
    return ImageClassification(calls, cell_ids, centres, crops, float(scale), segmentation)


def shared_rbc_diameter(paths, most=25):
    """One red-cell scale for single-cell images from the same scanner.

    A single-cell field holds few red cells beside a large white one, so a per-image estimate
    sometimes lands on the white cell (about twice the red-cell size) or on a red cell's pale
    centre (about half). All images of one scanner share one scale, so the median over up to
    ``most`` of them is robust to those misses. Unreadable files are skipped here (they are
    reported when classified).

    Returns
    -------
    float or None
        None if no file could be measured.
    """
    from napari_cytodiffusion.core.image import ImageError, to_rgb_float
    from napari_cytodiffusion.core.io import InputFileError, read_image
    from napari_cytodiffusion.core.scale import estimate_rbc_diameter

    step = max(1, len(paths) // most)
    estimates = []
    for path in list(paths)[::step][:most]:
        try:
            estimates.append(estimate_rbc_diameter(to_rgb_float(read_image(path))))
        except (ImageError, InputFileError):
            continue
    return float(np.median(estimates)) if estimates else None


def _phase(progress, start, end, resolution=1000):
    """Map a sub-task's (done, total) onto [start, end] of one progress bar of 1000 ticks."""
    if progress is None:
        return None

    def report(done, total):
        fraction = done / total if total else 0.0
        progress(int(resolution * (start + (end - start) * fraction)), resolution)

    return report


def calls_table(calls, cell_ids=None, centres=None):
    """Per-cell results as a pandas DataFrame.

    Columns: ``index`` (the cell's label value, or 0 for a single-cell image), ``label``,
    ``p_<class>`` for every class, ``uncertainty``, ``anomaly_score``, ``needs_review``,
    ``unet_evals``, and ``centroid_row`` / ``centroid_col`` when ``centres`` is given.
    """
    import pandas as pd

    rows = []
    for i, call in enumerate(calls):
        cell = cell_ids[i] if cell_ids is not None else None
        row = {"index": int(cell) if cell is not None else 0, "label": call.label}
        row.update({f"p_{name}": p for name, p in call.probabilities.items()})
        row.update(
            uncertainty=call.uncertainty,
            anomaly_score=call.anomaly_score,
            needs_review=call.needs_review,
            unet_evals=call.unet_evals,
        )
        if centres is not None:
            row.update(centroid_row=float(centres[i][0]), centroid_col=float(centres[i][1]))
        rows.append(row)
    return pd.DataFrame(rows)


def differential_count(labels, classes):
    """Number and percentage of cells per class, in ``classes`` order, as a DataFrame."""
    import pandas as pd

    labels = list(labels)
    counts = [labels.count(name) for name in classes]
    total = max(len(labels), 1)
    return pd.DataFrame(
        {"class": list(classes), "count": counts, "percent": [100 * c / total for c in counts]}
    )
