"""Export the cells people annotated as a labelled dataset, for ``train`` and ``adapt``."""

from pathlib import Path

import numpy as np


def export_annotated(image_path, out, image_size=64, labels=None, rbc_diameter=None):
    """Write the annotated cells of one smear (its ``.annotations.json``) into a class-folder
    dataset at ``out``; see :func:`~napari_cytodiffusion.core.annotations.export_cells`.

    Parameters
    ----------
    image_path : path
        The smear; its annotations are read from beside it.
    out : path
        The dataset folder (created; other smears' cells in it are kept).
    image_size : int
        The model's ``image_size`` (crops are made for it).
    labels : ndarray, optional
        The smear's white-cell labels; segmented again when not given (segmentation is
        deterministic, so the annotated cells are found again).

    Returns
    -------
    dict
        {class: cells written}; empty when the smear has no annotations.
    """
    import pandas as pd

    from napari_cytodiffusion.core.annotations import (
        annotate_labels,
        export_cells,
        load_annotations,
    )
    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.smear.prepare import prepare_smear
    from napari_cytodiffusion.core.smear.segmentation import segment_smear

    annotations = load_annotations(image_path)
    if annotations is None:
        return {}
    image = read_image(image_path)
    smear = prepare_smear(image, rbc_diameter)
    if labels is None:
        labels = segment_smear(smear).wbc_labels
    labels, human, _ = annotate_labels(labels, annotations)
    rows = []
    for value, label in human.items():
        rr, cc = np.nonzero(labels == value)
        rows.append(
            {
                "index": value,
                "annotated": label,
                "centroid_row": rr.mean(),
                "centroid_col": cc.mean(),
            }
        )
    table = pd.DataFrame(rows, columns=["index", "annotated", "centroid_row", "centroid_col"])
    source = str(Path(image_path).resolve())  # the full path: smears of one name stay apart
    return export_cells(smear, labels, table, out, image_size, source, smear.rbc_diameter)
