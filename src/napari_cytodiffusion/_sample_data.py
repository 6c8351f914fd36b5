"""Sample images shipped with the plugin (File > Open Sample).

Attribution and licences: ``sample_data/README.md``.
"""

from pathlib import Path

SAMPLE_FOLDER = Path(__file__).parent / "sample_data"
SAMPLES = {
    "cbc_monocyte_eosinophil": "CBC smear field: monocyte and eosinophil (MIT, Alam & Islam 2019)",
    "cbc_lymphocyte": "CBC smear field: lymphocyte and platelets (MIT, Alam & Islam 2019)",
    "pbc_lymphocyte": "PBC field: lymphocyte (CC BY 4.0, Acevedo et al. 2020)",
}


def sample_path(name):
    """Path of a bundled sample image, by its name in ``SAMPLES``."""
    if name not in SAMPLES:
        raise ValueError(f"Unknown sample {name!r}; choose one of {', '.join(SAMPLES)}.")
    return SAMPLE_FOLDER / f"{name}.jpg"


def _layer(name):
    from napari_cytodiffusion.core.io import read_image

    return [(read_image(sample_path(name)), {"name": name, "rgb": True}, "image")]


def cbc_monocyte_eosinophil():
    return _layer("cbc_monocyte_eosinophil")


def cbc_lymphocyte():
    return _layer("cbc_lymphocyte")


def pbc_lymphocyte():
    return _layer("pbc_lymphocyte")
