"""Colour normalisation of a smear towards the training smears, from its own references.

Every lab's smears differ in lamp colour, stain strength and the balance between the stain's
two dyes (the red, eosin-like dye that colours red cells and the blue-purple, azure-like dye
of the nuclei). This module measures both on the smear itself and maps its colours, in
optical-density (OD) space, onto those of the training smears (PBC, CellaVision,
May Grünwald-Giemsa):

1. **Background** (white balance): transmittance is taken relative to the smear's own empty
   slide, so the lamp's colour cancels.
2. **Red cells** (intensity and red-dye hue): the median OD of the smear's red-cell pixels is
   mapped onto PBC's median red cell. Red cells are the same in every normal smear, so this
   says how strongly this lab stains, whatever white cells the image holds.
3. **Nuclei** (blue-dye hue only): the OD *direction* of the smear's nuclei is turned onto
   PBC's. Only the direction is used, never the nuclei's darkness: a single-cell image holds
   one nucleus, and its darkness (a lymphocyte against a monocyte) is a cue the classifier
   needs.
4. **Only where needed**: a smear whose references lie within the range of PBC's own images
   is only white-balanced (the model was trained on that range, and re-mapping each PBC
   image onto the median one cost accuracy on PBC val); beyond that range the map is
   blended in, and applied fully at twice the range (:func:`mapping_weight`).

The map is one 3 x 3 matrix ``M`` acting on OD vectors (a Macenko-style swap of stain
vectors; with one anchor it is a per-channel Reinhard-style gain in OD space). It is bounded
(:data:`MAX_GAIN`) so that a bad reference cannot blow a crop up, and falls back to white
balance alone where a reference is missing (too few red cells, no nucleus). The same map is
used when cells are packed for training (:mod:`~napari_cytodiffusion.core.datasets`) and
when they are classified, so both see the same colours.

The references (:data:`REFERENCE_RBC_DENSITY`, :data:`REFERENCE_NUCLEUS_DIRECTION`) are
medians over PBC training images, measured by ``benchmarks/stain_reference.py``.
"""

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from napari_cytodiffusion.core.smear.stain import nucleus_mask, optical_density, total_density

# Background colour every crop is balanced to (the PBC CellaVision background).
REFERENCE_BACKGROUND = np.array([0.98, 0.89, 0.80], np.float32)
# Median OD of red-cell pixels and median OD direction of nucleus pixels over 400 PBC training
# images (benchmarks/stain_reference.py, results/stain_reference.json).
REFERENCE_RBC_DENSITY = np.array([0.1894, 0.2717, 0.1784], np.float32)
REFERENCE_NUCLEUS_DIRECTION = np.array([0.5008, 0.8427, 0.1978], np.float32)
# No channel's OD is scaled by more than this factor (or less than its inverse).
MAX_GAIN = 2.0
# The spread of the references over PBC training images (benchmarks/stain_reference.py): the
# SD of the red-cell OD per channel, and the 99th percentiles of the red cells' RMS z-score
# and of the nuclear hue's angle from the reference. A smear within them is left as it is
# (the model has seen such smears); beyond, the map is blended in, fully at twice them.
RBC_DENSITY_SD = np.array([0.0281, 0.0331, 0.0222], np.float32)
RBC_Z_TYPICAL = 2.7
NUCLEUS_ANGLE_TYPICAL = 5.0
# Red-cell pixels needed (at the overview's resolution) before they are trusted as a reference.
MIN_RBC_PIXELS = 150
# Nucleus pixels needed before the nuclei's hue is trusted.
MIN_NUCLEUS_PIXELS = 40
# "Nuclei" covering more of the image than this are red cells taken for nuclei (a purple stain).
MAX_NUCLEUS_SHARE = 0.25
# Red cells whose OD direction is further than this from PBC's are not used as a reference
# (a camera whose background saturates some channels sees no red-cell colour in them).
MAX_RBC_ANGLE_DEGREES = 30.0
# Stained pixels: total OD above this share of the 95th percentile of the non-nucleus
# pixels' total OD (relative, so that a weaker stain selects the same pixels), and above
# the floor (the empty slide's noise).
_STAINED_SHARE = 0.2
_STAINED_FLOOR = 0.04
# A stained region with a nucleus larger than this share of the image is a clump of cells.
_CLUMP_SHARE = 0.15
# Pixels whose chromatin score (green minus blue OD) is below this are not nucleus-like.
_NOT_NUCLEUS = 0.15


@dataclass
class ColourMap:
    """How one smear's colours are mapped onto the training smears'.

    Attributes
    ----------
    background : ndarray (3,)
        The smear's empty-slide colour.
    matrix : ndarray (3, 3)
        OD map: a pixel's OD vector ``d`` becomes ``matrix @ d``. Identity: white balance only.
    rbc_density : ndarray (3,) or None
        The median OD of the smear's red cells, when measured.
    nucleus_direction : ndarray (3,) or None
        Unit OD direction of its nuclei, when measured.
    """

    background: np.ndarray
    matrix: np.ndarray = field(default_factory=lambda: np.eye(3, dtype=np.float32))
    rbc_density: np.ndarray | None = None
    nucleus_direction: np.ndarray | None = None

    @property
    def is_white_balance(self):
        return bool(np.allclose(self.matrix, np.eye(3), atol=1e-6))

    def apply(self, rgb):
        """Float RGB in [0, 1] of this smear -> float32 RGB as the training smears show it."""
        rgb = np.asarray(rgb, np.float32)
        transmittance = np.clip(rgb, 1e-3, None) / np.clip(self.background, 1e-3, None)
        if self.is_white_balance:
            return np.clip(transmittance * REFERENCE_BACKGROUND, 0.0, 1.0)
        density = -np.log(transmittance)
        mapped = density @ self.matrix.T.astype(np.float32)
        return np.clip(np.exp(-mapped) * REFERENCE_BACKGROUND, 0.0, 1.0).astype(np.float32)

    def statistics(self):
        """The smear's colour references as one feature vector (for the domain-shift score):
        the background's colour (RGB over its brightest channel), red-cell OD, nuclear OD
        direction; NaN where not measured.

        Every part is blind to exposure, as the crops are (white balance divides it out): a
        dimmer lamp or shorter exposure is not an unfamiliar smear.

        Examples
        --------
        >>> bright = ColourMap(np.array([0.9, 0.8, 0.7]))
        >>> dim = ColourMap(np.array([0.45, 0.4, 0.35]))
        >>> bool(np.allclose(bright.statistics()[:3], dim.statistics()[:3]))
        True
        """
        missing = np.full(3, np.nan, np.float32)
        rbc = self.rbc_density if self.rbc_density is not None else missing
        nucleus = self.nucleus_direction if self.nucleus_direction is not None else missing
        tint = self.background / max(float(np.max(self.background)), 1e-3)
        return np.concatenate([tint, rbc, nucleus]).astype(np.float32)

    def as_dict(self):
        def listed(v):
            return None if v is None else [round(float(x), 4) for x in np.ravel(v)]

        return {
            "background": listed(self.background),
            "matrix": listed(self.matrix),
            "rbc_density": listed(self.rbc_density),
            "nucleus_direction": listed(self.nucleus_direction),
        }


def white_balance(background):
    """The map that only white-balances (what every crop got before stain normalisation)."""
    return ColourMap(np.asarray(background, np.float32))


def measure_colour_map(rgb, background, method="stain"):
    """Measure a smear's colour references and the map onto the training smears.

    Parameters
    ----------
    rgb : ndarray or SmearPixels
        Float RGB image in [0, 1]; large images are measured on a megapixel overview.
    background : array of 3 floats
        Its background colour.
    method : {"stain", "white-balance"}
        ``stain``: background, red cells and nuclear hue (see the module notes);
        ``white-balance``: background only.

    Returns
    -------
    ColourMap
    """
    from napari_cytodiffusion.core.smear.scale import overview

    background = np.asarray(background, np.float32)
    if method == "white-balance":
        return white_balance(background)
    if method != "stain":
        raise ValueError(
            f"Unknown colour normalisation {method!r}; use 'stain' or 'white-balance'."
        )
    small, _ = overview(rgb)
    density = optical_density(np.asarray(small, np.float32), background)
    rbc = red_cell_density(density)
    nucleus = nucleus_direction(density)
    weight = mapping_weight(rbc, nucleus)
    matrix = np.eye(3) + weight * (stain_matrix(rbc, nucleus) - np.eye(3))
    return ColourMap(background, matrix.astype(np.float32), rbc, nucleus)


def deviation(rbc_density=None, nucleus=None):
    """How far a smear's references are from PBC's, in units of PBC's own 99th percentile
    (1: as far as the least typical PBC image; 0 when neither reference was found)."""
    parts = [0.0]
    if rbc_density is not None:
        z = (np.asarray(rbc_density) - REFERENCE_RBC_DENSITY) / RBC_DENSITY_SD
        parts.append(float(np.sqrt(np.mean(z**2))) / RBC_Z_TYPICAL)
    if nucleus is not None:
        parts.append(_angle(nucleus, REFERENCE_NUCLEUS_DIRECTION) / NUCLEUS_ANGLE_TYPICAL)
    return max(parts)


def mapping_weight(rbc_density=None, nucleus=None):
    """How much of the stain map is applied: 0 for a smear within PBC's range of stains
    (:func:`deviation` up to 1), rising to 1 at twice PBC's range."""
    return float(np.clip(deviation(rbc_density, nucleus) - 1.0, 0.0, 1.0))


def red_cell_density(density, min_pixels=MIN_RBC_PIXELS):
    """Median OD of the red-cell pixels of an OD image, or None when too few are found.

    Red-cell pixels are stained pixels of stained regions that hold no nucleus: a white cell
    (its nucleus and the cytoplasm around it, with any red cell touching it) is left out
    whole, so the measure needs no scale. The black vignette of a photo is left out too.
    """
    from napari_cytodiffusion.core.smear.stain import vignette

    nuclei = nucleus_mask(density)
    if nuclei.mean() > MAX_NUCLEUS_SHARE:
        return None
    total = total_density(density)
    if (~nuclei).sum() < min_pixels:
        return None
    stained = total > max(_STAINED_FLOOR, _STAINED_SHARE * np.percentile(total[~nuclei], 95))
    regions, count = ndi.label(stained | nuclei)
    if count == 0:
        return None
    with_nucleus = np.unique(regions[nuclei])
    with_nucleus = with_nucleus[with_nucleus > 0]
    sizes = ndi.sum(np.ones_like(regions), regions, with_nucleus)
    # A white cell's region, unless red cells packed around it join it into a large clump
    # (a dense smear): then only a disc around each nucleus, as wide as the cell, is left out.
    clumps = with_nucleus[sizes > _CLUMP_SHARE * regions.size]
    excluded = np.isin(regions, with_nucleus[sizes <= _CLUMP_SHARE * regions.size])
    if len(clumps):
        inside = nuclei & np.isin(regions, clumps)
        radius = 2.0 * np.sqrt(_largest(inside) / np.pi) + 2
        excluded |= ndi.distance_transform_edt(~inside) <= radius
    candidates = stained & ~excluded
    candidates &= density[..., 1] - density[..., 2] < _NOT_NUCLEUS
    candidates &= ~vignette(density)
    if candidates.sum() < min_pixels:
        return None
    median = np.median(density[candidates], axis=0).astype(np.float32)
    if _angle(median, REFERENCE_RBC_DENSITY) > MAX_RBC_ANGLE_DEGREES:
        return None
    ratio = float(np.linalg.norm(median) / np.linalg.norm(REFERENCE_RBC_DENSITY))
    if not 0.25 <= ratio <= 3.0:  # not red cells: a dark rim, a smudge, the slide's edge
        return None
    return median


def _angle(a, b):
    """Angle in degrees between two OD vectors (90 when one is zero)."""
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norms < 1e-9:
        return 90.0
    return float(np.degrees(np.arccos(np.clip(np.dot(a, b) / norms, -1.0, 1.0))))


def _largest(mask):
    """Pixels of the largest connected region of ``mask`` (0 if empty)."""
    labels, count = ndi.label(mask)
    return float(np.bincount(labels.ravel())[1:].max()) if count else 0.0


def nucleus_direction(density, min_pixels=MIN_NUCLEUS_PIXELS):
    """Unit OD direction (hue of the nuclear stain) of the nucleus pixels, or None.

    The most chromatin-like third of the nucleus pixels is used (the mask also takes in some
    dense cytoplasm in some stains). None when the "nuclei" cover more than
    :data:`MAX_NUCLEUS_SHARE` of the image: then the mask has taken the red cells too.
    """
    nuclei = nucleus_mask(density)
    if nuclei.sum() < min_pixels or nuclei.mean() > MAX_NUCLEUS_SHARE:
        return None
    score = density[..., 1] - density[..., 2]
    core = nuclei & (score >= np.quantile(score[nuclei], 2 / 3))
    median = np.median(density[core], axis=0)
    norm = float(np.linalg.norm(median))
    return (median / norm).astype(np.float32) if norm > 1e-6 else None


def stain_matrix(rbc_density=None, nucleus=None):
    """The OD map from a smear's references onto the training references (see module notes).

    With both anchors, ``M`` takes the red-cell OD onto :data:`REFERENCE_RBC_DENSITY` and the
    nuclear direction onto :data:`REFERENCE_NUCLEUS_DIRECTION` (scaled as the red cells are),
    and the direction orthogonal to both onto its reference counterpart. With red cells only,
    it is a per-channel gain; with neither, the identity. Gains are bounded by
    :data:`MAX_GAIN`: the singular values of ``M`` are clipped to [1/MAX_GAIN, MAX_GAIN].
    """
    if rbc_density is None:
        return np.eye(3, dtype=np.float32)
    rbc = np.maximum(np.asarray(rbc_density, np.float64), 1e-3)
    ref = REFERENCE_RBC_DENSITY.astype(np.float64)
    scale = np.linalg.norm(ref) / np.linalg.norm(rbc)
    matrix = np.diag(np.clip(ref / rbc, 1 / MAX_GAIN, MAX_GAIN))
    if nucleus is not None:
        source = _basis(rbc, np.asarray(nucleus, np.float64))
        target = _basis(ref, REFERENCE_NUCLEUS_DIRECTION.astype(np.float64))
        if source is not None and target is not None:
            # Columns: red-cell OD, nuclear direction, their normal; mapped column by column.
            lengths = np.array([np.linalg.norm(rbc), 1.0, 1.0])
            wanted = target * np.array([np.linalg.norm(ref), scale, scale])
            matrix = wanted @ np.linalg.inv(source * lengths)
    u, s, vt = np.linalg.svd(matrix)
    matrix = u @ np.diag(np.clip(s, 1 / MAX_GAIN, MAX_GAIN)) @ vt
    return matrix.astype(np.float32)


def _basis(first, second):
    """Unit columns (first, second, their normal), or None when nearly parallel."""
    a = first / np.linalg.norm(first)
    b = second / np.linalg.norm(second)
    normal = np.cross(a, b)
    if np.linalg.norm(normal) < 0.15:  # under about 9 degrees apart: no second stain to see
        return None
    return np.stack([a, b, normal / np.linalg.norm(normal)], axis=1)
