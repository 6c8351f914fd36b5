"""`napari-cytodiffusion segment` on the bundled sample fields."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_cytodiffusion._sample_data import sample_path
from napari_cytodiffusion.cli import main

CBC = str(sample_path("cbc_monocyte_eosinophil"))
PBC = str(sample_path("pbc_lymphocyte"))


@pytest.fixture(scope="module")
def json_lines(tmp_path_factory):
    """One CLI run with --json and --out on two images, shared by the tests below."""
    out = tmp_path_factory.mktemp("segment")
    capture = subprocess.run(
        [
            sys.executable,
            "-m",
            "napari_cytodiffusion",
            "segment",
            CBC,
            PBC,
            "--json",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return [json.loads(line) for line in capture.stdout.splitlines()], out


def test_json_has_one_object_per_image(json_lines):
    records, _ = json_lines
    assert [r["file"] for r in records] == [CBC, PBC]
    for record in records:
        assert set(record) == {"file", "n_wbc", "n_rbc", "n_platelet", "rbc_diameter", "wbc_boxes"}
        assert len(record["wbc_boxes"]) == record["n_wbc"]
        assert 20 < record["rbc_diameter"] < 90  # PBC's about 29 px, CBC's about 77
        for box in record["wbc_boxes"]:
            assert len(box) == 4 and all(isinstance(v, int) for v in box)
            assert box[0] < box[2] and box[1] < box[3]
    assert records[0]["n_wbc"] == 2
    assert records[0]["n_rbc"] > 10


def test_out_writes_uint16_labels_and_cells_csv(json_lines):
    records, out = json_lines
    wbc = tifffile.imread(out / "cbc_monocyte_eosinophil_wbc_labels.tif")
    assert wbc.dtype == np.uint16 and wbc.shape == (480, 640)
    for kind in ("rbc", "platelet"):
        assert (
            tifffile.imread(out / f"cbc_monocyte_eosinophil_{kind}_labels.tif").dtype == np.uint16
        )
    nucleus = tifffile.imread(out / "cbc_monocyte_eosinophil_nucleus_labels.tif")
    assert nucleus.dtype == np.uint16 and set(np.unique(nucleus)) == set(np.unique(wbc))
    assert (nucleus[nucleus > 0] == wbc[nucleus > 0]).all() and (nucleus > 0).sum() < (
        wbc > 0
    ).sum()
    cells = pd.read_csv(out / "cbc_monocyte_eosinophil_cells.csv")
    white = cells[cells["cell_type"] == "wbc"]
    assert sorted(white["index"]) == [v for v in np.unique(wbc) if v]
    boxes = white[["bbox_min_row", "bbox_min_col", "bbox_max_row", "bbox_max_col"]]
    assert sorted(boxes.values.tolist()) == sorted(records[0]["wbc_boxes"])
    assert (cells["cell_type"] == "rbc").sum() == records[0]["n_rbc"]


def test_plain_output_and_given_diameter(capsys):
    assert main(["segment", PBC, "--rbc-diameter", "29"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(PBC) and "1 white cell," in line and "29.0 px" in line


def test_a_folder_stands_for_its_images(tmp_path, capsys):
    import shutil

    shutil.copy(PBC, tmp_path / "cell.jpg")
    (tmp_path / "empty").mkdir()
    assert main(["segment", str(tmp_path), str(tmp_path / "empty")]) == 2
    out, err = capsys.readouterr()
    assert out.startswith(str(tmp_path / "cell.jpg")) and "1 white cell" in out
    assert "a folder with no image files" in err and "1 of 2 images" in err


def test_earlier_results_are_replaced_only_when_asked(tmp_path, capsys):
    curated = tmp_path / "pbc_lymphocyte_cells.csv"
    curated.write_text("corrected by hand\n")
    assert main(["segment", PBC, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{curated} exists, from an earlier run" in err and "(--overwrite)" in err
    assert curated.read_text() == "corrected by hand\n"
    assert not (tmp_path / "pbc_lymphocyte_wbc_labels.tif").exists()  # refused before work
    assert main(["segment", PBC, "--out", str(tmp_path), "--overwrite"]) == 0
    assert "centroid_row" in curated.read_text()


def test_a_run_that_writes_nothing_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "new"
    assert main(["segment", str(tmp_path / "nope.png"), "--out", str(out)]) == 2
    assert "No such file" in capsys.readouterr().err and not out.exists()
