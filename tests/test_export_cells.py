"""``export-cells``: every annotated cell of every smear gets a file of its own, and the
manifest says which smear (by its full path) each came from."""

import csv
import shutil
from pathlib import Path

import pytest

from napari_cytodiffusion.cli import main
from napari_cytodiffusion.core.annotations import Annotations, CellAnnotation, save_annotations

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "napari_cytodiffusion" / "sample_data"


@pytest.fixture(scope="module")
def white_cell():
    """The centroid of the sample smear's first white cell."""
    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.smear.prepare import prepare_smear
    from napari_cytodiffusion.core.smear.segmentation import segment_smear

    pixels = read_image(SAMPLES / "cbc_lymphocyte.jpg")
    white = segment_smear(prepare_smear(pixels)).table("wbc").iloc[0]
    return pixels.shape[:2], (white.centroid_row, white.centroid_col)


def _annotated_smear(path, white_cell):
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(SAMPLES / "cbc_lymphocyte.jpg", path)
    shape, centre = white_cell
    save_annotations(Annotations(path.name, shape, [CellAnnotation(centre, "lymphocyte")]), path)
    return path


def test_smears_with_the_same_name_export_every_cell_once(tmp_path, white_cell, capsys):
    smears = [_annotated_smear(tmp_path / d / "a.jpg", white_cell) for d in ("ex", "ex2")]
    out = tmp_path / "exo"
    named_twice = [*map(str, smears), str(tmp_path / "ex" / "." / "a.jpg")]
    for _ in range(2):  # exporting again replaces the same files
        assert main(["export-cells", *named_twice, "--out", str(out)]) == 0
        assert capsys.readouterr().out.strip().endswith(f"2 cells in {out}: lymphocyte 2")
        crops = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
        rows = list(csv.DictReader(open(out / "manifest.csv")))
        assert len(crops) == 2 and sorted(row["file"] for row in rows) == crops
        assert sorted(row["source_image"] for row in rows) == [str(p.resolve()) for p in smears]


def test_a_folder_is_refused_with_what_to_give(tmp_path, white_cell, capsys):
    folder = _annotated_smear(tmp_path / "ex" / "a.jpg", white_cell).parent
    out = tmp_path / "exo"
    assert main(["export-cells", str(folder), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"{folder} is a folder" in error and "image files" in error
    assert not out.exists()


def test_a_dataset_exported_before_full_paths_is_exported_into_again(tmp_path, white_cell, capsys):
    """Earlier exports recorded a smear by its file name alone: exporting it again replaces
    its crops, not a second, hashed copy of every cell."""
    smear = _annotated_smear(tmp_path / "ex" / "a.jpg", white_cell)
    out = tmp_path / "exo"
    assert main(["export-cells", str(smear), "--out", str(out)]) == 0
    manifest = out / "manifest.csv"
    manifest.write_text(manifest.read_text().replace(str(smear.resolve()), "a.jpg"))
    assert main(["export-cells", str(smear), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(manifest)))
    assert [row["source_image"] for row in rows] == [str(smear.resolve())]
    assert len(list(out.rglob("*.png"))) == 1


def _smear_and_cells():
    """A small smear with two white cells, its labels and a classes table of them."""
    import numpy as np
    import pandas as pd

    labels = np.zeros((100, 120), np.uint32)
    labels[10:30, 10:30] = 1
    labels[50:70, 60:80] = 2
    pixels = np.empty((100, 120, 3), np.uint8)
    pixels[:] = (245, 230, 210)
    pixels[labels > 0] = (120, 70, 150)
    table = pd.DataFrame(
        {
            "index": [1, 2],
            "annotated": ["neutrophil", "monocyte"],
            "centroid_row": [19.5, 59.5],
            "centroid_col": [19.5, 69.5],
        }
    )
    return pixels, labels, table


def test_exporting_a_smear_again_replaces_its_earlier_crops(tmp_path):
    """A cell relabelled since its last export keeps no crop under its old class, and a cell
    deleted since keeps none at all; other smears' crops and files the manifest does not list
    stay."""
    from napari_cytodiffusion.core.annotations import export_cells

    pixels, labels, table = _smear_and_cells()
    out = tmp_path / "dataset"
    smear, other = str(tmp_path / "ex" / "a.jpg"), str(tmp_path / "ex" / "b.jpg")
    export_cells(pixels, labels, table, out, 32, smear, rbc_diameter=20.0)
    export_cells(pixels, labels, table.iloc[:1], out, 32, other, rbc_diameter=20.0)
    (out / "monocyte" / "mine.png").write_bytes(b"a person's own file")
    assert {p.relative_to(out).as_posix() for p in out.rglob("*.png")} == {
        "neutrophil/a_1.png",
        "monocyte/a_2.png",
        "neutrophil/b_1.png",
        "monocyte/mine.png",
    }

    table.loc[0, "annotated"] = "lymphocyte"  # relabelled
    table.loc[1, "annotated"] = "deleted"  # deleted
    assert export_cells(pixels, labels, table, out, 32, smear, rbc_diameter=20.0) == {
        "lymphocyte": 1
    }
    assert {p.relative_to(out).as_posix() for p in out.rglob("*.png")} == {
        "lymphocyte/a_1.png",
        "neutrophil/b_1.png",
        "monocyte/mine.png",
    }
    # A class folder the export emptied goes: it would still name a class with no cell.
    table.loc[0, "annotated"] = "blast"
    export_cells(pixels, labels, table, out, 32, smear, rbc_diameter=20.0)
    table.loc[0, "annotated"] = "lymphocyte"
    export_cells(pixels, labels, table, out, 32, smear, rbc_diameter=20.0)
    assert sorted(p.name for p in out.iterdir()) == [
        "lymphocyte",
        "manifest.csv",
        "monocyte",
        "neutrophil",
    ]
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert [(row["file"], row["label"], row["source_image"]) for row in rows] == [
        ("lymphocyte/a_1.png", "lymphocyte", smear),
        ("neutrophil/b_1.png", "neutrophil", other),
    ]


def test_an_exported_crop_is_the_cell_as_classify_crops_it(default_model, tmp_path):
    """Stain-normalised as classify normalises it: the export's centre is classify's crop."""
    import numpy as np
    from PIL import Image

    from napari_cytodiffusion.core.annotations import export_cells
    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.tasks.classify import classify

    pixels = read_image(SAMPLES / "cbc_monocyte_eosinophil.jpg")
    result = classify(pixels, default_model)
    table = result.table()
    table["annotated"] = table["label"]
    out = tmp_path / "dataset"
    size = default_model.image_size
    export_cells(pixels, result.cell_labels(), table, out, size, "smear.jpg")
    assert len(table) == 2
    for crop, row in zip(result.crops, table.itertuples(), strict=True):
        exported = np.asarray(Image.open(out / row.label / f"smear_{row.index}.png"))
        centre = exported[size // 2 : size // 2 + size, size // 2 : size // 2 + size]
        assert np.abs(centre.astype(int) - np.round(crop * 255)).max() <= 1
