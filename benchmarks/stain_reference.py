"""The colour references of the training smears: median red-cell OD and nuclear OD direction.

Measures :func:`~napari_cytodiffusion.core.smear.normalise.red_cell_density` and
:func:`~napari_cytodiffusion.core.smear.normalise.nucleus_direction` on PBC **train** images
(a fixed random sample) and writes their medians, which are the constants
``REFERENCE_RBC_DENSITY`` and ``REFERENCE_NUCLEUS_DIRECTION`` of ``core/smear/normalise.py``,
to ``benchmarks/results/stain_reference.json``. Also reports how often each reference is
found on the other data sets (``--n`` images each).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import DATA, RESULTS, pbc_records  # noqa: E402


def _measure(path):
    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.smear.image import to_rgb_float
    from napari_cytodiffusion.core.smear.normalise import nucleus_direction, red_cell_density
    from napari_cytodiffusion.core.smear.scale import background_colour
    from napari_cytodiffusion.core.smear.stain import optical_density

    rgb = to_rgb_float(read_image(path))
    background = background_colour(rgb)
    density = optical_density(rgb, background)
    return background, red_cell_density(density), nucleus_direction(density)


def _summary(paths):
    from napari_cytodiffusion.core.smear.normalise import mapping_weight

    backgrounds, rbcs, nuclei, weights = [], [], [], []
    for path in paths:
        background, rbc, nucleus = _measure(path)
        weights.append(mapping_weight(rbc, nucleus))
        backgrounds.append(background)
        if rbc is not None:
            rbcs.append(rbc)
        if nucleus is not None:
            nuclei.append(nucleus)
    out = {
        "images": len(paths),
        "background_median": np.median(backgrounds, axis=0).round(4).tolist(),
        "red_cells_found": len(rbcs) / len(paths),
        "nuclei_found": len(nuclei) / len(paths),
        # Share of images whose stain map is applied at all (weight > 0), and fully.
        "stain_map_applied": float(np.mean(np.array(weights) > 0)),
        "stain_map_applied_fully": float(np.mean(np.array(weights) >= 1)),
    }
    if rbcs:
        out["rbc_density_median"] = np.median(rbcs, axis=0).round(4).tolist()
        out["rbc_density_iqr"] = (
            np.subtract(*np.percentile(rbcs, [75, 25], axis=0)).round(4).tolist()
        )
    if nuclei:
        direction = np.median(nuclei, axis=0)
        direction = direction / np.linalg.norm(direction)
        out["nucleus_direction_median"] = direction.round(4).tolist()
        angles = np.degrees(np.arccos(np.clip(np.asarray(nuclei) @ direction, -1, 1)))
        out["nucleus_angle_degrees_quantiles_50_90_99"] = (
            np.percentile(angles, [50, 90, 99]).round(2).tolist()
        )
    if rbcs:
        from napari_cytodiffusion.core.smear.normalise import REFERENCE_RBC_DENSITY

        out["rbc_density_sd"] = np.std(rbcs, axis=0).round(4).tolist()
        spread = np.std(rbcs, axis=0)
        z = np.sqrt(np.mean(((np.asarray(rbcs) - REFERENCE_RBC_DENSITY) / spread) ** 2, axis=1))
        out["rbc_z_quantiles_50_90_99"] = np.percentile(z, [50, 90, 99]).round(2).tolist()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=400)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    train = pbc_records("train")
    pbc = [train[i].path for i in sorted(rng.choice(len(train), args.n, replace=False))]
    few = max(20, args.n // 8)
    others = {
        "wbc_dataset1": sorted((DATA / "segmentation_wbc_dataset1").glob("*_image.png"))[:few],
        "cbc_train": sorted((DATA / "cbc" / "train" / "images").glob("*.jpg"))[:few],
        "pig_train": sorted((DATA / "wbc_smartphone_pig" / "train" / "images").glob("*.jpg"))[:few],
    }
    test = pbc_records("test")
    pbc_test = [test[i].path for i in sorted(rng.choice(len(test), args.n, replace=False))]
    report = {"pbc_train": _summary(pbc), "pbc_test": _summary(pbc_test)}
    for name, paths in others.items():
        report[name] = _summary(paths)
    report["note"] = (
        "PBC train images only set the references; the other sets show how often the "
        "references are found there, and how often the stain map is applied (it is left out "
        "for smears within PBC's range). Optical density relative to each image's background."
    )
    (RESULTS / "stain_reference.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
