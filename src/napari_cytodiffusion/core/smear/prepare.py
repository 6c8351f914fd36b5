"""A smear image made ready once: float RGB, background colour, red-cell scale, stain, and
the colour map onto the training smears.

Everything downstream (segmentation, locating and cropping cells, counterfactual placement)
takes a :class:`PreparedSmear` instead of the raw image, so the conversion and the image-wide
estimates are computed once per image, not once per step.
"""

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from napari_cytodiffusion.core.smear.image import ImageError, SmearPixels
from napari_cytodiffusion.core.smear.scale import (
    GIVEN,
    WHITE_CELL,
    background_colour,
    estimate_scale,
)

# How crops are colour-normalised unless told otherwise (see core/smear/normalise.py).
DEFAULT_NORMALISATION = "stain"
# Plausible red-cell diameters in pixels: from a phone photo at low power to a 100x scan.
MIN_RBC_DIAMETER, MAX_RBC_DIAMETER = 3.0, 1000.0


@dataclass
class PreparedSmear:
    """One smear image with the references read off it.

    Attributes
    ----------
    rgb : SmearPixels or ndarray
        The image as float32 RGB in [0, 1]: indexing it (``rgb[rows, cols]``) converts only
        that window, so large images are never converted whole.
    background : ndarray float32 (3,)
        Colour of the empty slide.
    rbc_diameter : float
        Red-cell diameter in pixels, the scale of every crop.
    normalisation : str
        How its crops are colour-normalised: ``"stain"`` (background, red cells and nuclear
        hue, see :mod:`~napari_cytodiffusion.core.smear.normalise`) or ``"white-balance"``.
    scale_source : str
        Where ``rbc_diameter`` came from: ``"given"`` (by the caller, also as the fallback
        of an image with too few red cells), ``"red cells"`` (measured on them) or
        ``"white cell"`` (too few red cells: from the white cell's size), see
        :func:`~napari_cytodiffusion.core.smear.scale.estimate_scale`.
    """

    rgb: np.ndarray
    background: np.ndarray
    rbc_diameter: float
    normalisation: str = DEFAULT_NORMALISATION
    scale_source: str = GIVEN

    @property
    def shape(self):
        """(rows, cols) of the image."""
        return self.rgb.shape[:2]

    @cached_property
    def colour_map(self):
        """The :class:`~napari_cytodiffusion.core.smear.normalise.ColourMap` of this smear onto
        the training smears, measured on first use (on an overview of a large image)."""
        from napari_cytodiffusion.core.smear.normalise import measure_colour_map

        return measure_colour_map(self.rgb, self.background, self.normalisation)


def prepare_smear(
    image,
    rbc_diameter=None,
    progress=None,
    normalisation=None,
    background=None,
    fallback_rbc_diameter=None,
):
    """Convert an image once and measure its background colour and red-cell scale.

    Parameters
    ----------
    image : array-like or PreparedSmear
        RGB(A) image of any dtype (see :func:`~napari_cytodiffusion.core.smear.image.to_rgb_float`);
        an already prepared smear is returned as it is, or with the given scale.
    rbc_diameter : float, optional
        Red-cell diameter in pixels; estimated from the image when None or 0.
    progress : callable, optional
        ``progress(done, total)`` while the scale is estimated; raise ``Cancelled`` to stop.
    normalisation : {"stain", "white-balance"}, optional
        How crops of this smear are colour-normalised; :data:`DEFAULT_NORMALISATION` when not
        given (see :mod:`~napari_cytodiffusion.core.smear.normalise`).
    background : array of 3 floats, optional
        The image's background colour when already measured
        (:func:`~napari_cytodiffusion.core.smear.scale.background_colour`).
    fallback_rbc_diameter : float, optional
        The scale of an image with too few red cells to measure (a tight crop around one
        white cell), in place of the estimate from the white cell's own size, which would
        make every cell look the same size: for example the scale of the scanner a model
        was adapted to (``DiffusionModel.lab_rbc_diameter``).

    Returns
    -------
    PreparedSmear

    Raises
    ------
    ImageError
        If the image is not a usable RGB(A) image, or too small or featureless for its scale
        to be estimated (give ``rbc_diameter`` then).
    ValueError
        If ``rbc_diameter`` is not a plausible number of pixels.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.full((64, 64, 3), 230, np.uint8)
    >>> image[20:40, 20:40] = (120, 60, 150)
    >>> smear = prepare_smear(image, rbc_diameter=12)
    >>> smear.rbc_diameter, smear.rgb[20:22, 20:22].dtype
    (12.0, dtype('float32'))
    """
    validate_rbc_diameter(rbc_diameter)
    validate_rbc_diameter(fallback_rbc_diameter)
    if isinstance(image, PreparedSmear):
        if not rbc_diameter and normalisation in (None, image.normalisation):
            return image
        again = PreparedSmear(
            image.rgb,
            image.background,
            float(rbc_diameter or image.rbc_diameter),
            normalisation or image.normalisation,
            GIVEN if rbc_diameter else image.scale_source,
        )
        if "colour_map" in image.__dict__ and again.normalisation == image.normalisation:
            again.colour_map = image.colour_map
        return again
    pixels = image if isinstance(image, SmearPixels) else SmearPixels(image)
    if background is None:
        background = background_colour(pixels)
    source = GIVEN
    if not rbc_diameter:
        estimate = estimate_scale(pixels, background, progress)
        rbc_diameter, source = estimate.diameter, estimate.source
        too_small = rbc_diameter < MIN_RBC_DIAMETER  # a few pixels of one cell, or of noise
        if fallback_rbc_diameter and (source == WHITE_CELL or too_small):
            rbc_diameter, source = fallback_rbc_diameter, GIVEN
        elif too_small:
            raise ImageError(
                f"No red-cell scale can be read from this {pixels.shape[0]} x "
                f"{pixels.shape[1]} image (it measures {rbc_diameter:.1f} px): give the "
                "red-cell diameter in pixels."
            )
    return PreparedSmear(
        pixels, background, float(rbc_diameter), normalisation or DEFAULT_NORMALISATION, source
    )


def validate_rbc_diameter(rbc_diameter):
    """Raise ValueError unless ``rbc_diameter`` is None, 0 (estimate it) or plausible."""
    if rbc_diameter is None or rbc_diameter == 0:
        return
    if not MIN_RBC_DIAMETER <= rbc_diameter <= MAX_RBC_DIAMETER:
        raise ValueError(
            f"rbc_diameter={rbc_diameter} px is implausible; give the red-cell diameter in "
            f"pixels ({MIN_RBC_DIAMETER:g} to {MAX_RBC_DIAMETER:g}), or 0 / None to estimate it "
            "from the image."
        )
