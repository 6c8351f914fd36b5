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
