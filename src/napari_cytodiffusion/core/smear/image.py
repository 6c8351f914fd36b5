"""Checking user images and reading them as float RGB in [0, 1], whole or window by window.

:class:`SmearPixels` wraps an image of any dtype (a numpy array, or any lazily sliced array
such as a memory-mapped TIFF, zarr or dask array) and converts only the windows that are read,
so a large smear is never converted to float all at once.
"""

from pathlib import PurePath

import numpy as np

from napari_cytodiffusion.core.smear.threads import in_threads

# Image-wide checks and the intensity scale are read off at most this many sampled pixels.
_SAMPLE_PIXELS = 1_000_000


class ImageError(ValueError):
    """An image the core cannot use; the message says why and what to do."""


def to_rgb_float(image):
    """Return ``image`` as float32 RGB in [0, 1], shape (rows, cols, 3).

    Accepts uint8, uint16, other integer and float images, RGB or RGBA (alpha is dropped).

    Raises
    ------
    ImageError
        If the image is not 2-D RGB(A), is empty, contains NaN or infinity, or is blank.
    """
    return np.asarray(SmearPixels(image))


class SmearPixels:
    """Read-only float32 RGB view of an image: ``pixels[rows, cols]`` converts that window.

    Parameters
    ----------
    image : array-like
        RGB(A) image of shape (rows, cols, 3 or 4), any dtype; numpy arrays and lazy arrays
        (anything with ``shape``, ``dtype`` and numpy-style slicing) are read only where
        indexed.

    Raises
    ------
    ImageError
        If the image is not 2-D RGB(A), is empty, contains NaN or infinity, or is blank.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.zeros((20, 30, 3), np.uint8)
    >>> image[5:10, 5:10] = 255
    >>> pixels = SmearPixels(image)
    >>> pixels.shape, float(pixels[5:7, 5:7].max()), pixels[0, 0].tolist()
    ((20, 30, 3), 1.0, [0.0, 0.0, 0.0])
    """

    dtype = np.dtype(np.float32)
    ndim = 3

    def __init__(self, image):
        if isinstance(image, str | PurePath):
            raise ImageError(
                f"Got the path {str(image)!r}, not its pixels: read it first, with "
                "napari_cytodiffusion.core.io.read_image (or open_image for a large file)."
            )
        if not (hasattr(image, "shape") and hasattr(image, "dtype")):
            image = np.asarray(image)
        _validate_layout(image.shape, image.dtype)
        self._data = image
        self._overview = None
        self.shape = (int(image.shape[0]), int(image.shape[1]), 3)
        sample = self.sample_raw()
        # An array in memory is checked whole (one NaN must not slip through); a lazy one
        # by its sample here, and window by window as it is read.
        if isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating):
            _check_finite(image[..., :3])
        self._top = _intensity_top(image.dtype, sample)
        if float(self._convert(sample).std()) < 1e-3:
            raise ImageError("The image is blank (one flat colour): there are no cells to find.")

    def sample_raw(self, pixels=_SAMPLE_PIXELS):
        """A strided sample of the raw RGB values (at most about ``pixels`` pixels)."""
        step = max(1, int(np.ceil(np.sqrt(self.shape[0] * self.shape[1] / pixels))))
        return np.asarray(self._data[::step, ::step, :3])

    @property
    def top(self):
        """The raw value that maps to 1.0."""
        return self._top

    def read_raw(self, rows, cols):
        """Raw RGB values of a window (``rows`` and ``cols`` are slices, integers, or index
        arrays as made by ``np.ix_``)."""
        if isinstance(rows, np.ndarray) or isinstance(cols, np.ndarray):
            # Read the bounding window once (lazy arrays slice, not fancy-index), then pick.
            rows, cols = np.asarray(rows), np.asarray(cols)
            r0, c0 = int(rows.min()), int(cols.min())
            block = np.asarray(self._data[r0 : int(rows.max()) + 1, c0 : int(cols.max()) + 1, :3])
            return block[rows - r0, cols - c0]
        return np.asarray(self._data[rows, cols, :3])

    @classmethod
    def trusted(cls, image, top):
        """A view of an image already checked, with its known intensity ``top`` (no reading)."""
        pixels = object.__new__(cls)
        pixels._data, pixels._top, pixels._overview = image, float(top), None
        pixels.shape = (int(image.shape[0]), int(image.shape[1]), 3)
        return pixels

    def region(self, rows, cols):
        """The pixels of a window (slices), read into memory, converted as this image is."""
        return SmearPixels.trusted(self.read_raw(rows, cols), self._top)

    def overview(self, pixels=1_000_000):
        """(the image shrunk to at most ``pixels`` pixels by block means, the factor used).

        Computed once and kept: the background, the scale and the segmentation share it.
        """
        factor = max(1, int(np.ceil(np.sqrt(self.shape[0] * self.shape[1] / pixels))))
        if self._overview is None or self._overview[1] != factor:
            self._overview = (self.block_means(factor), factor)
        return self._overview

    def block_means(self, factor, band_rows=1024):
        """The image shrunk by an integer ``factor``: the mean of each factor x factor block.

        Blocks at the bottom and right edges average the pixels they hold. Read in bands of
        rows (several at once, one per core), so memory stays bounded for any image size.
        Returns float32 (ceil(rows / factor), ceil(cols / factor), 3) in [0, 1].
        """
        factor = int(factor)
        if factor <= 1:
            return self[:, :]
        rows, cols = self.shape[:2]
        out = np.empty((-(-rows // factor), -(-cols // factor), 3), np.float32)
        band = max(1, band_rows // factor) * factor

        def shrink(r0):
            raw = self.read_raw(slice(r0, min(r0 + band, rows)), slice(None))
            means = _block_sums(raw, factor) / _block_counts(raw.shape[:2], factor)[..., None]
            out[r0 // factor : r0 // factor + len(means)] = self._convert(means)

        in_threads(shrink, range(0, rows, band))
        return out

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        spatial = tuple(index[:2]) + (slice(None),) * (2 - len(index[:2]))
        out = self._convert(self.read_raw(*spatial))
        return out[(Ellipsis, *index[2:])] if len(index) > 2 else out

    def __array__(self, dtype=None, copy=None):
        out = self[:, :]
        return out if dtype is None else out.astype(dtype)

    def _convert(self, raw):
        out = raw.astype(np.float32)
        if np.issubdtype(raw.dtype, np.floating):
            _check_finite(out)
        if self._top != 1.0:
            out /= self._top
        return np.clip(out, 0.0, 1.0, out=out)


def _validate_layout(shape, dtype):
    if len(shape) == 2:
        raise ImageError(
            "This is a grayscale image; blood-smear analysis needs an RGB colour image "
            "(shape rows x cols x 3)."
        )
    if len(shape) != 3 or shape[-1] not in (3, 4):
        raise ImageError(
            "Expected an RGB or RGBA image of shape (rows, cols, 3 or 4), got shape "
            f"{tuple(shape)}. For a stack, pick one plane first."
        )
    if shape[0] < 8 or shape[1] < 8:
        raise ImageError(f"The image is too small ({shape[0]} x {shape[1]} pixels).")
    if np.issubdtype(dtype, np.bool_):
        raise ImageError("Got a boolean mask where an RGB image is needed.")


def _intensity_top(dtype, values):
    """The raw value that means full intensity, from the dtype and the values' range.

    The range is read off the brightest 0.01 % but one, so a single hot or corrupt pixel
    (1e38 in a float file, 65535 in a 12-bit camera's image) does not darken the whole image.
    A uint16 image's top is that of the fewest bits (8, 10, 12, 14 or 16) that hold its range.
    """
    if np.issubdtype(dtype, np.integer) and np.dtype(dtype).itemsize == 1:
        return 255.0
    flat = np.asarray(values).reshape(-1)
    if np.issubdtype(dtype, np.floating):
        _check_finite(flat)
    highest = float(np.percentile(flat, 99.99)) if flat.size > 10_000 else float(flat.max())
    if np.issubdtype(dtype, np.integer):
        if np.dtype(dtype).kind == "u" and np.dtype(dtype).itemsize == 2:  # a camera's 8-16 bits
            return next(2.0**bits - 1 for bits in (8, 10, 12, 14, 16) if highest <= 2**bits - 1)
        return float(max(highest, 1))
    if highest <= 1.0:
        return 1.0
    return 255.0 if highest <= 255.0 else highest


def _check_finite(values):
    if not np.isfinite(values).all():
        raise ImageError("The image contains NaN or infinite values; fill or mask them first.")


def _block_sums(raw, factor):
    """Sums of the factor x factor blocks of (rows, cols, 3) values; edge blocks are partial."""
    accumulator = np.float64 if np.issubdtype(raw.dtype, np.floating) else np.uint32
    rows, cols = raw.shape[:2]
    # Strided adds, rows then columns: several times faster than one reduction over the two
    # block axes of a reshaped view.
    by_rows = np.zeros((-(-rows // factor), cols, raw.shape[2]), accumulator)
    for offset in range(min(factor, rows)):
        part = raw[offset::factor]
        by_rows[: len(part)] += part
    sums = np.zeros((by_rows.shape[0], -(-cols // factor), raw.shape[2]), accumulator)
    for offset in range(min(factor, cols)):
        part = by_rows[:, offset::factor]
        sums[:, : part.shape[1]] += part
    return sums


def _block_counts(shape, factor):
    """Pixels in each factor x factor block of an image of ``shape`` (rows, cols)."""
    rows = np.minimum(factor, shape[0] - np.arange(0, shape[0], factor))
    cols = np.minimum(factor, shape[1] - np.arange(0, shape[1], factor))
    return np.outer(rows, cols)
