"""The segmentation core on real smear images (the bundled samples and the shared CBC data)."""

import numpy as np
import pytest

from napari_cytodiffusion._sample_data import sample_path
from napari_cytodiffusion.core.io import read_image
from napari_cytodiffusion.core.progress import Cancelled
from napari_cytodiffusion.core.smear.segmentation import FEATURE_COLUMNS, label_dtype, segment_smear

# White-cell boxes of the CBC sample field (BloodImage_00010, VOC annotation), end-exclusive.
CBC_SAMPLE_WBC_BOXES = [[229, 23, 421, 204], [253, 239, 470, 510]]


def box_iou(a, b):
    rows = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    cols = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - rows * cols
    return rows * cols / union


@pytest.fixture(scope="module")
def cbc_field():
    return read_image(sample_path("cbc_monocyte_eosinophil"))


@pytest.fixture(scope="module")
def cbc_result(cbc_field):
    return segment_smear(cbc_field)


def test_finds_each_annotated_white_cell_once(cbc_result):
    boxes = cbc_result.boxes("wbc")
    assert len(boxes) == 2
    for truth in CBC_SAMPLE_WBC_BOXES:
        assert max(box_iou(box, truth) for box in boxes) >= 0.5


def test_red_cells_and_scale_are_plausible(cbc_result):
    # The field shows about 25 red cells (16 annotated); red cells here are 80-95 px across.
    assert 15 <= cbc_result.count("rbc") <= 40
    assert 65 <= cbc_result.rbc_diameter <= 100


def test_features_describe_the_labels(cbc_field, cbc_result):
    features = cbc_result.features
    assert tuple(features.columns) == FEATURE_COLUMNS
    for kind, labels in (
        ("wbc", cbc_result.wbc_labels),
        ("rbc", cbc_result.rbc_labels),
        ("platelet", cbc_result.platelet_labels),
    ):
        assert labels.dtype == np.uint16 and labels.shape == cbc_field.shape[:2]
        table = cbc_result.table(kind)
        assert sorted(table["index"]) == [v for v in np.unique(labels) if v]
        for row in table.itertuples():
            mask = labels == row.index
            rows, cols = np.nonzero(mask)
            assert row.area == mask.sum()
            assert (row.bbox_min_row, row.bbox_max_row) == (rows.min(), rows.max() + 1)
            assert (row.bbox_min_col, row.bbox_max_col) == (cols.min(), cols.max() + 1)
            assert row.centroid_row == pytest.approx(rows.mean())
            assert row.centroid_col == pytest.approx(cols.mean())
            assert row.mean_r == pytest.approx(cbc_field[mask][:, 0].mean() / 255, abs=1e-4)
    wbc = cbc_result.table("wbc")
    assert ((wbc["nucleus_fraction"] > 0.2) & (wbc["nucleus_fraction"] < 0.9)).all()
    nuclei = cbc_result.nucleus_labels
    assert np.all(np.isin(nuclei[nuclei > 0], wbc["index"]))
    assert np.all(cbc_result.wbc_labels[nuclei > 0] == nuclei[nuclei > 0])


def test_cell_types_do_not_overlap(cbc_result):
    wbc, rbc = cbc_result.wbc_labels > 0, cbc_result.rbc_labels > 0
    assert not np.any(wbc & rbc)
    assert not np.any(wbc & (cbc_result.platelet_labels > 0))


def test_same_cells_in_any_dtype_and_with_alpha(cbc_field, cbc_result):
    alpha = np.full(cbc_field.shape[:2] + (1,), 255, np.uint8)
    variants = [
        cbc_field.astype(np.uint16) * 257,
        cbc_field.astype(np.float32) / 255,
        np.concatenate([cbc_field, alpha], axis=-1),
    ]
    for image in variants:
        result = segment_smear(image, rbc_diameter=cbc_result.rbc_diameter)
        assert result.count("wbc") == cbc_result.count("wbc")
        same = np.mean((result.wbc_labels > 0) == (cbc_result.wbc_labels > 0))
        assert same > 0.99


def test_single_cell_field_with_given_scale():
    result = segment_smear(read_image(sample_path("pbc_lymphocyte")), rbc_diameter=29)
    assert result.count("wbc") == 1 and result.scale_source == "given"
    cell = result.table("wbc").iloc[0]
    # The lymphocyte sits in the middle of the 160 x 160 field, about 45 px (1.5 red cells)
    # across with its rim of cytoplasm.
    assert abs(cell.centroid_row - 80) < 15 and abs(cell.centroid_col - 80) < 15
    assert 38 <= cell.equivalent_diameter <= 54
    assert 0.5 <= cell.nucleus_fraction <= 0.95
    assert result.count("platelet") >= 1
    assert result.count("rbc") >= 8


def test_eosinophil_keeps_its_granular_cytoplasm(cbc_field, cbc_result):
    """The red granules around the eosinophil's nucleus are part of its cell."""
    from napari_cytodiffusion.core.smear.stain import nucleus_score, optical_density

    box = CBC_SAMPLE_WBC_BOXES[1]  # the eosinophil, right of the monocyte
    rows, cols = np.mgrid[box[0] : box[2], box[1] : box[3]]
    half_rows, half_cols = (box[2] - box[0]) / 2, (box[3] - box[1]) / 2
    inner = np.hypot((rows - box[0]) / half_rows - 1, (cols - box[1]) / half_cols - 1) < 0.8
    density = optical_density(
        cbc_field[box[0] : box[2], box[1] : box[3]] / 255.0, cbc_result.background
    )
    # Granules: stained, but red rather than chromatin-purple (green-minus-blue density low).
    granules = inner & (density.sum(-1) > 0.15) & (nucleus_score(density) < 0.15)
    labels = cbc_result.wbc_labels[box[0] : box[2], box[1] : box[3]]
    eosinophil = np.bincount(labels[inner].ravel())[1:].argmax() + 1
    assert granules.sum() > 2000
    assert np.mean(labels[granules] == eosinophil) > 0.8
    assert box_iou(cbc_result.boxes("wbc")[eosinophil - 1], box) > 0.7


def test_tiles_count_each_cell_once(cbc_field):
    mosaic = np.concatenate([cbc_field, cbc_field[:, ::-1]], axis=1)  # 480 x 1280
    whole = segment_smear(mosaic, rbc_diameter=80, tile_size=4096)
    tiled = segment_smear(mosaic, rbc_diameter=80, tile_size=256)  # cores 480 px: 3 tiles
    assert tiled.count("wbc") == whole.count("wbc") == 4
    for box in whole.boxes("wbc"):
        assert max(box_iou(box, other) for other in tiled.boxes("wbc")) > 0.9
    assert abs(tiled.count("rbc") - whole.count("rbc")) <= 0.1 * whole.count("rbc")


def test_progress_reports_and_cancel_stops(cbc_field):
    calls = []
    segment_smear(
        cbc_field, rbc_diameter=80, progress=lambda done, total: calls.append((done, total))
    )
    assert len(calls) >= 5
    assert calls[-1][0] == calls[-1][1]
    assert all(0 <= done <= total for done, total in calls)

    seen = []

    def stop_at_third(done, total):
        seen.append(done)
        if len(seen) == 3:
            raise Cancelled()

    with pytest.raises(Cancelled):
        segment_smear(cbc_field, progress=stop_at_third)


def test_cbc_fields_against_annotation(cbc_dir):
    """Two CBC training fields: the annotated white cells are found (IoU >= 0.5)."""
    import xml.etree.ElementTree as ElementTree

    for name in ("BloodImage_00001", "BloodImage_00002"):
        image = read_image(cbc_dir / "train" / "images" / f"{name}.jpg")
        root = ElementTree.parse(cbc_dir / "train" / "annotations" / f"{name}.xml").getroot()
        truth = [
            [int(float(o.find("bndbox").find(k).text)) for k in ("ymin", "xmin", "ymax", "xmax")]
            for o in root.iter("object")
            if o.find("name").text == "WBC"
        ]
        boxes = segment_smear(image).boxes("wbc")
        assert len(boxes) == len(truth)
        for box in truth:
            assert max(box_iou(box, found) for found in boxes) >= 0.5


def test_scale_comes_from_the_red_cells_or_else_the_white_cell():
    from napari_cytodiffusion.core.smear.image import to_rgb_float
    from napari_cytodiffusion.core.smear.scale import RED_CELLS, WHITE_CELL, estimate_scale

    field = to_rgb_float(read_image(sample_path("pbc_lymphocyte")))  # red cells of 29 px
    whole = estimate_scale(field)
    assert whole.source == RED_CELLS and 26 <= whole.diameter <= 34
    # A tight crop around the lymphocyte holds no whole red cell: its size sets the scale.
    crop = estimate_scale(field[45:115, 45:115])
    assert crop.source == WHITE_CELL and crop.red_cells < 2
    assert 22 <= crop.diameter <= 38
    assert segment_smear(field[45:115, 45:115]).scale_source == WHITE_CELL


@pytest.mark.parametrize("name", ["cbc_lymphocyte", "cbc_monocyte_eosinophil"])
def test_the_scale_follows_the_magnification(name):
    # Enlarged 1.5 times, a 512-px window holds about four red cells across, and a white cell
    # or a clump outvoted them (the second sample read 22 % large).
    from PIL import Image

    from napari_cytodiffusion.core.smear.image import to_rgb_float
    from napari_cytodiffusion.core.smear.scale import estimate_scale

    image = Image.fromarray(read_image(sample_path(name)))
    large = image.resize((image.width * 3 // 2, image.height * 3 // 2), Image.Resampling.LANCZOS)
    native = estimate_scale(to_rgb_float(np.asarray(image))).diameter
    enlarged = estimate_scale(to_rgb_float(np.asarray(large))).diameter
    assert abs(np.log(enlarged / (1.5 * native))) < np.log(1.1)


def test_granules_level_with_the_red_cells_do_not_set_the_scale(cbc_dir):
    """Under another lab's colours (the segmentation benchmark's simulation, seed 9), this
    field's wide search scored an eosinophil's granules (radius 5 px) level with its red cells
    (1.955 against 1.949) and the scale came out 10 px instead of 95. Both answers are now
    measured closely, with the white cells left out, and the red cells win."""
    import sys
    from pathlib import Path

    from napari_cytodiffusion.core.smear.image import to_rgb_float
    from napari_cytodiffusion.core.smear.scale import estimate_rbc_diameter

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from segmentation import other_lab

    rgb = read_image(cbc_dir / "train" / "images" / "BloodImage_00009.jpg")
    native = estimate_rbc_diameter(to_rgb_float(rgb))
    changed_rgb = np.clip(other_lab(rgb, 9) + 0.5, 0, 255).astype(np.uint8)
    changed = estimate_rbc_diameter(to_rgb_float(changed_rgb))
    assert 85 <= native <= 105 and abs(np.log(changed / native)) < np.log(1.1)


def test_detector_file_is_plain_arrays_trained_without_test_splits():
    from napari_cytodiffusion.core.smear.detector import layer_shapes, load_detector

    detector = load_detector()
    for name, (cin, cout) in layer_shapes(tuple(detector.metadata["channels"])).items():
        kernel, bias = detector._weights[name]
        assert tuple(kernel.shape[:2]) == (cout, cin) and tuple(bias.shape) == (cout,)
    assert detector.metadata["trained_on"]
    assert not any("test" in name for name in detector.metadata["trained_on"])


def test_detector_training_writes_a_detector_that_runs_as_trained(cbc_dir, tmp_path):
    import torch

    from napari_cytodiffusion.core.smear import detector_training as training
    from napari_cytodiffusion.core.smear.detector import forward, load_detector

    fields = {"cbc/train": training.cbc_fields(cbc_dir / "train")[:2]}
    out = tmp_path / "detector.npz"
    layers = training.train(fields, steps=3, out=out, batch=2, pool_size=4, log=lambda _: None)
    detector = load_detector(out)
    assert detector.metadata["trained_on"] == {"cbc/train": 2}
    density = np.random.default_rng(0).uniform(0, 1, (40, 48, 3)).astype(np.float32)
    body, core = detector.maps(density)
    assert body.shape == core.shape == (40, 48)
    # The folded weights (batch norm inside the convolutions) compute what the trained layers
    # do, on the image and its mirror images.
    layers.eval()
    with torch.no_grad():
        x = torch.from_numpy(density.transpose(2, 0, 1).copy())[None]
        views = [
            forward(x.flip(axes), lambda name, y: layers[name](y)).flip(axes)
            for axes in [(), (3,), (2,), (2, 3)]
        ]
        logits = torch.stack(views).mean(0)[0].numpy()
    np.testing.assert_allclose(body, 1 / (1 + np.exp(-logits[0])), atol=1e-4)


def test_the_detector_judges_a_mirrored_smear_as_the_smear_mirrored():
    from napari_cytodiffusion.core.smear.detector import load_detector

    density = np.random.default_rng(1).uniform(0, 1.5, (70, 90, 3)).astype(np.float32)
    body, core = load_detector().maps(density)
    for flip in (np.fliplr, np.flipud):
        mirrored_body, mirrored_core = load_detector().maps(np.ascontiguousarray(flip(density)))
        np.testing.assert_allclose(mirrored_body, flip(body), atol=1e-5)
        np.testing.assert_allclose(mirrored_core, flip(core), atol=1e-5)


@pytest.mark.parametrize("name", ["039", "194"])
def test_a_tight_single_cell_crop_gets_its_cell_from_the_chromatin(wbc_masks_dir, name):
    # Crops of another microscope in which the detector finds no white cell at all.
    image = read_image(wbc_masks_dir / f"{name}_image.png")[..., :3]
    truth = read_image(wbc_masks_dir / f"{name}_mask.png")  # 128 cytoplasm, 255 nucleus
    found = segment_smear(image)
    assert found.count("wbc") == 1
    cell, nucleus = found.wbc_labels > 0, found.nucleus_labels > 0
    dice = 2 * (cell & (truth > 0)).sum() / (cell.sum() + (truth > 0).sum())
    assert dice > 0.85
    assert (nucleus & (truth == 255)).sum() > 0.7 * (truth == 255).sum()


@pytest.mark.parametrize("name", ["PLATELET_105490", "PLATELET_111377"])
def test_a_platelet_field_has_no_white_cell(pbc_dir, name):
    # The chromatin fallback once took the central platelet of such a field for a white cell;
    # a white cell has cytoplasm around its chromatin, a platelet has none to grow.
    found = segment_smear(read_image(pbc_dir / "platelet" / f"{name}.jpg"))
    assert found.count("wbc") == 0
    assert found.count("platelet") == 1


def test_label_type_holds_every_cell():
    assert label_dtype(65_535) == np.uint16
    assert label_dtype(65_536) == np.uint32
