"""Reading images from disk with messages a user can act on, and writing files safely."""

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np


class InputFileError(OSError):
    """A file that is missing or cannot be read as an image."""


def read_image(path):
    """Read a PNG, JPEG, BMP or TIFF file into a numpy array.

    Raises
    ------
    InputFileError
        If the file does not exist or is not a readable image.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"No such file: {path}")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return np.asarray(tifffile.imread(path))
        from PIL import Image

        with Image.open(path) as image:
            if image.mode in ("P", "CMYK", "YCbCr", "LAB", "HSV"):
                image = image.convert("RGB")
            return np.asarray(image)
    except Exception as error:  # any decoder failure means the same thing to the user
        raise InputFileError(f"Cannot read {path} as an image: {error}") from error


@contextmanager
def atomic_write(path):
    """Yield a temporary path beside ``path``; it becomes ``path`` only if the block succeeds.

    A crash or error mid-write leaves any earlier file at ``path`` untouched and no partial
    file under the final name. The temporary name keeps the suffix, so writers that choose
    the format by extension still work.
    """
    path = Path(path)
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
