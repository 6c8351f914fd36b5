"""Checking and converting user images into the float RGB arrays the core works on."""

import numpy as np


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
    image = np.asarray(image)
    if image.ndim == 2:
        raise ImageError(
            "This is a grayscale image; blood-smear analysis needs an RGB colour image "
            "(shape rows x cols x 3)."
        )
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ImageError(
            "Expected an RGB or RGBA image of shape (rows, cols, 3 or 4), got shape "
            f"{image.shape}. For a stack, pick one plane first."
        )
    if image.shape[0] < 8 or image.shape[1] < 8:
        raise ImageError(f"The image is too small ({image.shape[0]} x {image.shape[1]} pixels).")
    rgb = image[..., :3]
    if np.issubdtype(rgb.dtype, np.bool_):
        raise ImageError("Got a boolean mask where an RGB image is needed.")
    if np.issubdtype(rgb.dtype, np.integer):
        top = 255.0 if rgb.dtype.itemsize == 1 else float(max(int(rgb.max()), 1))
        if rgb.dtype == np.uint16 and rgb.max() > 4095:
            top = 65535.0
        elif rgb.dtype == np.uint16:
            top = 4095.0 if rgb.max() > 255 else 255.0
        out = rgb.astype(np.float32) / top
    else:
        out = rgb.astype(np.float32)
        if not np.isfinite(out).all():
            raise ImageError("The image contains NaN or infinite values; fill or mask them first.")
        if out.max() > 1.0:
            out = out / (255.0 if out.max() <= 255.0 else float(out.max()))
    out = np.clip(out, 0.0, 1.0)
    if float(out.std()) < 1e-3:
        raise ImageError("The image is blank (one flat colour): there are no cells to find.")
    return out
