"""Segment cells: every white cell, red cell and platelet of a smear image."""

from dataclasses import dataclass
from pathlib import Path

from napari_cytodiffusion.core.report import count_text
from napari_cytodiffusion.core.smear.segmentation import CELL_TYPES, DEFAULT_TILE, segment_smear


@dataclass
class Segmented:
    """The cells of one smear and what the faces show of them.

    Attributes
    ----------
    segmentation : SmearSegmentation
        Labels, features, and the prepared smear (``segmentation.smear``).
    """

    segmentation: object

    @property
    def smear(self):
        return self.segmentation.smear

    def counts(self):
        """{"wbc": n, "rbc": n, "platelet": n}."""
        return {kind: self.segmentation.count(kind) for kind in CELL_TYPES}

    def summary(self):
        """One line: the counts and the scale."""
        counts = self.counts()
        return (
            f"{count_text(counts['wbc'], 'white cell')}, {count_text(counts['rbc'], 'red cell')}, "
            f"{count_text(counts['platelet'], 'platelet')} "
            f"(red-cell diameter {self.segmentation.rbc_diameter:.1f} px)"
        )

    def record(self):
        """The counts, the red-cell diameter in pixels (the scale every size depends on) and
        the white-cell boxes as plain values (for JSON)."""
        counts = {f"n_{kind}": n for kind, n in self.counts().items()}
        diameter = round(float(self.segmentation.rbc_diameter), 2)
        return {**counts, "rbc_diameter": diameter, "wbc_boxes": self.segmentation.boxes("wbc")}


def segment(image, rbc_diameter=None, tile_size=DEFAULT_TILE, progress=None):
    """Find the white cells, red cells and platelets of a smear image.

    Parameters
    ----------
    image : array-like or PreparedSmear
        RGB(A) image of any dtype.
    rbc_diameter : float, optional
        Red-cell diameter in pixels; estimated from the image when None or 0.
    tile_size : int
        Side of the tiles large images are processed in.
    progress : callable, optional
        ``progress(done, total)``; raise ``Cancelled`` from it to stop.

    Returns
    -------
    Segmented

    Examples
    --------
    >>> from napari_cytodiffusion._sample_data import sample_path
    >>> from napari_cytodiffusion.core.io import read_image
    >>> found = segment(read_image(sample_path("cbc_monocyte_eosinophil")))
    >>> found.counts()["wbc"]
    2
    """
    return Segmented(segment_smear(image, rbc_diameter, progress, tile_size))


LABEL_KINDS = (*CELL_TYPES, "nucleus")


def segmentation_files(stem):
    """The paths :func:`write_segmentation` writes for ``stem``: the labels of each kind,
    then the cells table."""
    labels = [Path(f"{stem}_{kind}_labels.tif") for kind in LABEL_KINDS]
    return [*labels, Path(f"{stem}_cells.csv")]


def write_segmentation(result, stem):
    """Write ``STEM_{wbc,rbc,platelet,nucleus}_labels.tif`` and ``STEM_cells.csv``.

    The labels keep their type: uint16, or uint32 for more than 65,535 cells of a type. A
    white cell's nucleus carries the white cell's label value.

    Each file is written under a temporary name and renamed when complete. Returns the paths
    written.
    """
    import tifffile

    from napari_cytodiffusion.core.io import atomic_write

    segmentation = result.segmentation
    *label_paths, table_path = paths = segmentation_files(stem)
    for kind, path in zip(LABEL_KINDS, label_paths, strict=True):
        # One full-resolution array at a time: all but the white cells are made on access.
        labels = getattr(segmentation, f"{kind}_labels")
        with atomic_write(path) as partial:
            tifffile.imwrite(partial, labels, compression="zlib")
        del labels
    with atomic_write(table_path) as partial:
        segmentation.features.to_csv(partial, index=False)
    return paths
