"""Figure: found red cells against the CBC RBC boxes of training fields (docs/images/).

    python docs/scripts/figure_rbc_annotation.py

Magenta: red cells found; green: annotated RBC boxes; yellow: white cells found.
"""

import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from skimage.segmentation import find_boundaries

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from segmentation import DATA, read_rgb, voc_boxes  # noqa: E402

from napari_cytodiffusion.core.smear.segmentation import segment_smear  # noqa: E402

FIELDS = ("BloodImage_00005", "BloodImage_00058")


def panel(name):
    image = read_rgb(DATA / "cbc" / "train" / "images" / f"{name}.jpg")
    result = segment_smear(image)
    out = image.copy()
    out[find_boundaries(result.rbc_labels)] = (255, 0, 255)
    out[find_boundaries(result.wbc_labels)] = (255, 255, 0)
    for r0, c0, r1, c1 in voc_boxes(DATA / "cbc" / "train" / "annotations" / f"{name}.xml")["RBC"]:
        r1, c1 = min(r1, out.shape[0] - 1), min(c1, out.shape[1] - 1)
        for width in range(2):
            out[r0:r1, [c0 + width, c1 - width]] = (0, 200, 0)
            out[[r0 + width, r1 - width], c0:c1] = (0, 200, 0)
    return out


if __name__ == "__main__":
    figure = np.concatenate([panel(name) for name in FIELDS], axis=1)
    iio.imwrite(REPO / "docs" / "images" / "segment_rbc_annotation.png", figure)
