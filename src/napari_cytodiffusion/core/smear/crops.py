"""Cutting cells out of an image at the scale and colour the model was trained on.

Every cell reaches the model the same way, whether it comes from a smear field, a
CellaVision-style single-cell image or a training folder: centred, resampled so that a red-cell
diameter spans a fixed number of model pixels, and with the background white-balanced to a
reference colour. That keeps absolute cell size (a key cue: lymphocyte versus monocyte) while
removing the microscope's magnification and the lamp's colour.

A :class:`CellSite` says where one cell is and how it is cropped; it also maps results made
on the crop (heat maps, edited cells) back onto the image.
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from napari_cytodiffusion.core.smear.image import ImageError
from napari_cytodiffusion.core.smear.normalise import REFERENCE_BACKGROUND
from napari_cytodiffusion.core.smear.stain import nucleus_mask, optical_density

# Field of view of a model crop, in red-cell diameters: the largest monocytes still fit.
FIELD_OF_VIEW_RBC = 2.5
# The central cell of a single-cell image is sought this many red-cell diameters around the
# image centre.
CENTRAL_SEARCH_RBC = 8.0


@dataclass
class CellSite:
    """Where a cell lies in its image, and the scale and colour it is cropped at.

    Attributes
    ----------
    centre : (float, float)
        Cell centre (row, col) in image pixels.
    rbc_diameter : float
        The image's red-cell diameter in pixels.
    background : ndarray
        The image's background colour (white balance reference).
    field_of_view : float
        Side of the crop in red-cell diameters.
    colour : ColourMap, optional
        The smear's colour normalisation (:mod:`~napari_cytodiffusion.core.smear.normalise`);
        white balance against ``background`` alone when not given.
    """

    centre: tuple
    rbc_diameter: float
    background: np.ndarray
    field_of_view: float = FIELD_OF_VIEW_RBC
    colour: object = None

    def crop(self, rgb, size):
        """The normalised ``size`` x ``size`` crop of this cell (see :func:`crop_cell`)."""
        return crop_cell(
            rgb,
            self.centre,
            self.rbc_diameter,
            size,
            self.field_of_view,
            self.background,
            colour=self.colour,
        )

    def placement(self, size):
        """(origin (row, col), step) of a ``size`` crop: see :func:`crop_placement`."""
        return crop_placement(self.centre, self.rbc_diameter, size, self.field_of_view)

    def to_image(self, values, image_shape):
        """Crop-space values resampled onto the image grid (NaN outside the crop)."""
        return crop_to_image(
            values, image_shape, self.centre, self.rbc_diameter, self.field_of_view
        )


def smear_cell_site(smear, centre, field_of_view=FIELD_OF_VIEW_RBC):
    """The site of the cell at ``centre`` of a prepared smear: its scale and its colour map."""
    return CellSite(
        tuple(centre),
        smear.rbc_diameter,
        smear.background,
        field_of_view,
        getattr(smear, "colour_map", None),
    )


def central_cell_site(smear, field_of_view=FIELD_OF_VIEW_RBC):
    """The site of the cell a single-cell image is about (see :func:`locate_central_cell`)."""
    return smear_cell_site(smear, locate_central_cell(smear), field_of_view)


def instance_labels(labels):
    """``labels`` as an integer array, checked to be instance labels: 0 for the background
    and a positive whole number for each cell, of an integer type or floats that are whole
    numbers (as a labels image read from some file formats is).

    Raises
    ------
    ValueError
        If a value is negative, not a whole number, or not a number.
    """
    labels = np.asarray(labels)
    if labels.dtype.kind in "bu":
        return labels
    if labels.dtype.kind not in "if":
        raise _not_labels(f"values of type {labels.dtype}")
    bad = ~np.isfinite(labels) | (labels < 0) | (labels != np.round(labels))
    if bad.any():
        raise _not_labels(repr(labels[bad][0].item()))
    return labels if labels.dtype.kind == "i" else labels.astype(np.int64)


def _not_labels(found):
    """The error for labels holding ``found``, saying what labels are and how to make them."""
    return ValueError(
        "Cell labels must be whole numbers, 0 for the background and 1, 2, ... for the "
        f"cells; these hold {found}. Label the cells again (a napari labels layer, or "
        "skimage.measure.label)."
    )


def labelled_cell_sites(smear, labels, cell_ids=None):
    """Sites of labelled cells, each at its label's centroid.

    Parameters
    ----------
    smear : PreparedSmear
    labels : ndarray
        Instance labels of the smear's shape (see :func:`instance_labels`).
    cell_ids : sequence of int, optional
        The cells wanted; every label when not given.

    Raises
    ------
    ValueError
        If the shapes differ, a label is not a non-negative whole number, or a wanted cell id
        is 0 or absent from ``labels``.
    """
    labels = instance_labels(labels)
    if labels.shape != smear.shape:
        raise ValueError(
            f"The labels {labels.shape} do not match the image {smear.shape}: they differ in "
            "shape. Pick the labels layer that was made from this image."
        )
    present = np.unique(labels)
    present = present[present != 0]
    if cell_ids is None:
        cell_ids = present
    missing = sorted(set(int(i) for i in cell_ids) - set(int(i) for i in present))
    if missing:
        raise ValueError(
            f"No cell with label {missing[0]}: give the label value of an existing cell "
            "(0 is the background)."
        )
    ids = [int(i) for i in cell_ids]
    centres = np.array(ndi.center_of_mass(labels > 0, labels, ids)).reshape(-1, 2)
    return [smear_cell_site(smear, c) for c in centres]


def model_crop_site(size):
    """The site of an image that already is a model crop: cropping it changes nothing."""
    centre = ((size - 1) / 2, (size - 1) / 2)
    return CellSite(centre, size / FIELD_OF_VIEW_RBC, REFERENCE_BACKGROUND.copy())


def is_model_crop(image, size):
    """True for a ``size`` x ``size`` image: a crop already (generated or exported cells)."""
    return tuple(np.shape(image)[:2]) == (size, size)


def locate_central_cell(smear):
    """Return the (row, col) centre of the nucleated cell or platelet nearest the image centre.

    Only the pixels within ``CENTRAL_SEARCH_RBC`` red-cell diameters of the centre are looked
    at (a single-cell image is smaller than that, and a large image is never converted whole).
    Nucleus fragments closer than a third of a red cell are merged first, so the lobes of a
    neutrophil count as one cell.

    Raises
    ------
    ImageError
        If nothing near the centre is stained as a nucleus or a platelet is (an empty field,
        a background photo): there is no cell to classify.
    """
    rbc_diameter = smear.rbc_diameter
    reach = int(np.ceil(CENTRAL_SEARCH_RBC * rbc_diameter))
    centre = np.array(smear.shape, float) / 2
    window = tuple(slice(max(0, int(c) - reach), int(c) + reach) for c in centre)
    origin = np.array([w.start for w in window], float)
    nuclei = nucleus_mask(optical_density(np.asarray(smear.rgb[window]), smear.background))
    if nuclei.sum() < 4:
        raise ImageError(
            f"No cell found: nothing within {CENTRAL_SEARCH_RBC:.0f} red-cell diameters of the "
            "image centre is stained as a nucleus or a platelet is. Check that this is an "
            "image of a stained blood cell (a smear field: segment it instead)."
        )
    grown = ndi.binary_dilation(nuclei, iterations=max(1, int(rbc_diameter / 3)))
    labels, count = ndi.label(grown)
    labels[~nuclei] = 0
    index = np.arange(1, count + 1)
    centroids = np.array(ndi.center_of_mass(nuclei, labels, index)).reshape(-1, 2) + origin
    sizes = ndi.sum(nuclei, labels, index)
    # Ignore specks (debris, bits of a neighbour at the border) unless nothing else is there.
    keep = sizes >= 0.02 * rbc_diameter**2
    if keep.any():
        centroids = centroids[keep]
    nearest = np.argmin(((centroids - centre) ** 2).sum(axis=1))
    return tuple(centroids[nearest])


def normalised_cell(image, size, rbc_diameter=None, field_of_view=FIELD_OF_VIEW_RBC):
    """The central cell of a single-cell image, centred and normalised in scale and colour.

    Parameters
    ----------
    image : array-like or PreparedSmear
    size : int
        Side of the crop in pixels.
    rbc_diameter : float, optional
        Red-cell diameter in pixels; estimated from the image when not given.

    Returns
    -------
    ndarray float32 (size, size, 3)
    """
    from napari_cytodiffusion.core.smear.prepare import prepare_smear

    smear = prepare_smear(image, rbc_diameter)
    return central_cell_site(smear, field_of_view).crop(smear.rgb, size)


def single_cell_crop(image, size, rbc_diameter=None, name=None):
    """:func:`normalised_cell`, except that a ``size`` x ``size`` image is a crop already.

    ``name`` (a file, "plane 3") starts the message of an image that cannot be used, so that
    one image of many is found.
    """
    from napari_cytodiffusion.core.smear.image import to_rgb_float

    if is_model_crop(image, size):
        return to_rgb_float(image)
    try:
        return normalised_cell(image, size, rbc_diameter)
    except ImageError as error:
        if name is None:
            raise
        raise ImageError(f"{name}: {error}") from error


def crop_cell(
    rgb,
    centre,
    rbc_diameter,
    size,
    field_of_view=FIELD_OF_VIEW_RBC,
    background=None,
    colour=None,
):
    """Cut a ``size`` x ``size`` crop centred on ``centre``, normalised in scale and colour.

    Parameters
    ----------
    rgb : ndarray
        Float RGB image in [0, 1].
    centre : (float, float)
        Cell centre (row, col) in ``rgb`` pixels.
    rbc_diameter : float
        Red-cell diameter of ``rgb`` in pixels (see ``estimate_rbc_diameter``).
    size : int
        Output side length in pixels.
    field_of_view : float
        Side of the crop in red-cell diameters.
    background : array of 3 floats, optional
        The image's background colour; estimated when not given.
    colour : ColourMap, optional
        The smear's colour map onto the training smears (stain normalisation); when not
        given, the crop is only white-balanced against ``background``.

    Returns
    -------
    ndarray
        float32 (size, size, 3) in [0, 1]. Outside the image is filled by reflection.
    """
    if background is None:
        from napari_cytodiffusion.core.smear.scale import background_colour

        background = background_colour(rgb)
    step = field_of_view * rbc_diameter / size  # source pixels per output pixel
    offsets = (np.arange(size) - (size - 1) / 2) * step
    rows = centre[0] + offsets[:, None] + 0 * offsets[None, :]
    cols = centre[1] + 0 * offsets[:, None] + offsets[None, :]
    # Crop generously, blur against aliasing when shrinking, then sample.
    margin = int(np.ceil(step * size / 2 + 3 * step + 2))
    r0, c0 = int(centre[0]) - margin, int(centre[1]) - margin
    window = _window(rgb, r0, c0, 2 * margin + 1)
    if step > 1.0:
        sigma = 0.45 * step
        window = ndi.gaussian_filter(window, sigma=(sigma, sigma, 0), mode="reflect")
    out = np.empty((size, size, 3), np.float32)
    for channel in range(3):
        out[..., channel] = ndi.map_coordinates(
            window[..., channel], [rows - r0, cols - c0], order=1, mode="reflect"
        )
    if colour is not None:
        return colour.apply(out)
    gain = REFERENCE_BACKGROUND / np.clip(np.asarray(background, np.float32), 1e-3, None)
    return np.clip(out * gain, 0.0, 1.0)


def _window(rgb, r0, c0, side):
    """``rgb[r0:r0+side, c0:c0+side]`` with reflection where it runs past the border."""
    rows = np.clip(np.arange(r0, r0 + side), -rgb.shape[0] + 1, 2 * rgb.shape[0] - 2)
    cols = np.clip(np.arange(c0, c0 + side), -rgb.shape[1] + 1, 2 * rgb.shape[1] - 2)
    rows = np.where(
        rows < 0, -rows, np.where(rows >= rgb.shape[0], 2 * rgb.shape[0] - 2 - rows, rows)
    )
    cols = np.where(
        cols < 0, -cols, np.where(cols >= rgb.shape[1], 2 * rgb.shape[1] - 2 - cols, cols)
    )
    return rgb[np.ix_(rows, cols)]


def crop_placement(centre, rbc_diameter, size, field_of_view=FIELD_OF_VIEW_RBC):
    """Where a ``crop_cell`` crop lies in its source image.

    Crop pixel (i, j) was sampled at source (row0 + i * step, col0 + j * step). For napari,
    a layer holding the crop with ``scale=(step, step)`` and ``translate=(row0, col0)`` sits
    exactly over the cell in an image layer of the source (both in the same world frame).

    Returns
    -------
    origin : (float, float)
        Source (row, col) of crop pixel (0, 0).
    step : float
        Source pixels per crop pixel.
    """
    step = field_of_view * rbc_diameter / size
    half = (size - 1) / 2 * step
    return (float(centre[0]) - half, float(centre[1]) - half), float(step)


def crop_to_image(values, image_shape, centre, rbc_diameter, field_of_view=FIELD_OF_VIEW_RBC):
    """Resample crop-space ``values`` back onto the source image's pixel grid.

    The inverse of :func:`crop_cell`'s geometry: for every source pixel inside the crop's
    footprint, the value at its crop coordinates (bilinear); NaN outside the footprint.

    Parameters
    ----------
    values : ndarray (size, size) or (size, size, channels)
        A map or image made at the crop's pixels (a heat map, an edited crop).
    image_shape : tuple
        Shape of the source image; only the first two entries (rows, cols) are used.
    centre, rbc_diameter, field_of_view
        The arguments the crop was made with.

    Returns
    -------
    ndarray float32 (rows, cols) or (rows, cols, channels)
    """
    values = np.asarray(values, np.float32)
    size = values.shape[0]
    (row0, col0), step = crop_placement(centre, rbc_diameter, size, field_of_view)
    rows = (np.arange(image_shape[0]) - row0) / step
    cols = (np.arange(image_shape[1]) - col0) / step
    inside = ((rows >= -0.5) & (rows <= size - 0.5))[:, None] & (
        (cols >= -0.5) & (cols <= size - 0.5)
    )[None, :]
    grid_rows = np.broadcast_to(rows[:, None], inside.shape)
    grid_cols = np.broadcast_to(cols[None, :], inside.shape)
    channels = values.reshape(size, size, -1)
    out = np.full(inside.shape + (channels.shape[-1],), np.nan, np.float32)
    for c in range(channels.shape[-1]):
        out[inside, c] = ndi.map_coordinates(
            channels[..., c], [grid_rows[inside], grid_cols[inside]], order=1, mode="nearest"
        )
    return out[..., 0] if values.ndim == 2 else out
