"""Counterfactual heat maps and edits, and their placement back on the source image."""

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image
from scipy import ndimage as ndi

from napari_cytodiffusion import cli
from napari_cytodiffusion.core.classes import CLASSES
from napari_cytodiffusion.core.model import counterfactual
from napari_cytodiffusion.core.model.generation import generate_cells
from napari_cytodiffusion.core.smear.crops import (
    FIELD_OF_VIEW_RBC,
    REFERENCE_BACKGROUND,
    crop_cell,
    crop_placement,
    crop_to_image,
    labelled_cell_sites,
    model_crop_site,
)
from napari_cytodiffusion.core.smear.prepare import PreparedSmear


@pytest.fixture(scope="module")
def cell(default_model):
    """A neutrophil crop (synthetic, so the test needs no data set)."""
    return generate_cells(default_model, "neutrophil", 1, steps=4, seed=3).images[0]


@pytest.fixture(scope="module")
def explanation(default_model, cell):
    return counterfactual.explain_cell(default_model, cell, trials=4, seed=1)


def test_placement_matches_where_crop_cell_samples():
    image = np.zeros((200, 300, 3), np.float32)
    image[...] = REFERENCE_BACKGROUND
    image[90, 160] = 0.0  # one dark pixel
    centre, rbc = (100.0, 150.0), 12.8  # 2.5 * 12.8 / 64 = 0.5 source px per crop px
    crop = crop_cell(image, centre, rbc, 64, background=REFERENCE_BACKGROUND)
    (row0, col0), step = crop_placement(centre, rbc, 64)
    assert step == pytest.approx(FIELD_OF_VIEW_RBC * rbc / 64)
    # Bilinear sampling spreads the dot over a symmetric tent: its centroid is the dot.
    i, j = ndi.center_of_mass(REFERENCE_BACKGROUND.sum() - crop.sum(axis=-1))
    assert (row0 + i * step, col0 + j * step) == (pytest.approx(90), pytest.approx(160))


def test_crop_values_go_back_to_their_image_pixels():
    centre, rbc, shape = (75.0, 85.0), 51.2, (150, 170)  # two source px per crop px
    values = np.zeros((64, 64), np.float32)
    values[10, 40] = 1.0
    back = crop_to_image(values, shape, centre, rbc)
    (row0, col0), step = crop_placement(centre, rbc, 64)
    assert back.shape == shape
    assert np.unravel_index(np.nanargmax(back), shape) == (row0 + 10 * step, col0 + 40 * step)
    inside = np.isfinite(back)
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    assert rows[0] == pytest.approx(row0, abs=1) and rows[-1] == pytest.approx(
        row0 + 63 * step, abs=1
    )
    assert cols[0] == pytest.approx(col0, abs=1) and cols[-1] == pytest.approx(
        col0 + 63 * step, abs=1
    )
    rgb = crop_to_image(np.ones((64, 64, 3)), shape, centre, rbc)
    assert rgb.shape == (*shape, 3) and np.nanmin(rgb) == 1.0


def test_a_model_crop_is_its_own_crop(cell):
    site = model_crop_site(64)
    np.testing.assert_array_equal(site.crop(cell, 64), cell)


def test_labelled_cell_site_is_the_label_centroid():
    rgb = np.full((80, 90, 3), 0.9, np.float32)
    smear = PreparedSmear(rgb, np.full(3, 0.9, np.float32), 10.0)
    labels = np.zeros((80, 90), np.uint16)
    labels[20:31, 40:61] = 7
    (site,) = labelled_cell_sites(smear, labels, [7])
    assert site.centre == (pytest.approx(25.0), pytest.approx(50.0))
    assert site.rbc_diameter == 10.0
    with pytest.raises(ValueError, match="No cell with label 3"):
        labelled_cell_sites(smear, labels, [3])
    with pytest.raises(ValueError, match="differ in shape"):
        labelled_cell_sites(smear, labels[:10], [7])


def test_maps_towards_every_class(explanation):
    assert explanation.maps.shape == (len(CLASSES), 64, 64)
    assert explanation.errors.shape == (len(CLASSES),)
    assert (
        explanation.source == explanation.predicted == CLASSES[int(np.argmin(explanation.errors))]
    )
    assert np.all(explanation.map_for(explanation.source) == 0)
    others = [explanation.map_for(c) for c in CLASSES if c != explanation.source]
    assert all(m.max() > 0 for m in others)


def test_same_seed_same_maps_and_a_given_source_is_kept(default_model, cell, explanation):
    again = counterfactual.explain_cell(default_model, cell, trials=4, seed=1)
    np.testing.assert_allclose(again.maps, explanation.maps, atol=1e-5)
    given = counterfactual.explain_cell(default_model, cell, source="lymphocyte", trials=4, seed=1)
    assert given.source == "lymphocyte"
    np.testing.assert_allclose(given.errors, explanation.errors, atol=1e-6)
    assert np.all(given.map_for("lymphocyte") == 0)


def test_reports_progress_per_chunk_of_trials(default_model, cell):
    calls = []
    counterfactual.explain_cell(
        default_model, cell, trials=6, progress=lambda d, t: calls.append((d, t))
    )
    assert calls == [(1, 2), (2, 2)]


def test_noise_edit(default_model, cell):
    def edit(**options):
        return counterfactual.counterfactual_image(
            default_model, cell, "eosinophil", steps=6, method="noise", **options
        )

    edited = edit(seed=2)
    assert edited.shape == (64, 64, 3) and edited.dtype == np.float32
    assert 0 <= edited.min() and edited.max() <= 1
    np.testing.assert_allclose(edit(seed=2), edited, atol=1e-5)
    # A weak edit keeps the cell: closer to the input than a strong one.
    weak, strong = edit(strength=0.2), edit(strength=0.9)
    assert np.abs(weak - cell).mean() < np.abs(strong - cell).mean()


def test_inversion_edit_keeps_the_cell(default_model):
    # A fully sampled cell: the 4-step one of the other tests is too rough to invert well.
    cell = generate_cells(default_model, "neutrophil", 1, steps=10, seed=3).images[0]
    with pytest.raises(ValueError, match="current class"):
        counterfactual.counterfactual_image(default_model, cell, "eosinophil")

    def edit(target):
        return counterfactual.counterfactual_image(default_model, cell, target, "neutrophil")

    # Towards its own class, at the default strength and guidance, the edit is the cell.
    itself = edit("neutrophil")
    itself_rmse = np.sqrt(np.mean((itself - cell) ** 2))
    assert itself_rmse < 2 / 255
    # Towards another class it changes the cell, deterministically.
    other = edit("eosinophil")
    assert np.sqrt(np.mean((other - cell) ** 2)) > 4 * itself_rmse
    np.testing.assert_allclose(edit("eosinophil"), other, atol=1e-5)
    with pytest.raises(ValueError, match="strength"):
        counterfactual.counterfactual_image(default_model, cell, "eosinophil", strength=0)


def test_mean_map_grid_groups_cells_by_source(default_model, cell):
    crops = np.stack([cell, cell[::-1], cell[:, ::-1]])
    grid, counts, mean_crops = counterfactual.mean_map_grid(
        default_model, crops, ["neutrophil", "neutrophil", "monocyte"], trials=2
    )
    n, m = CLASSES.index("neutrophil"), CLASSES.index("monocyte")
    assert grid.shape == (8, 8, 64, 64)
    assert counts[n] == 2 and counts[m] == 1 and counts.sum() == 3
    assert np.isnan(grid[CLASSES.index("basophil")]).all()
    assert np.all(grid[n, n] == 0) and grid[n, m].max() > 0
    np.testing.assert_allclose(mean_crops[n], (cell + cell[::-1]) / 2, atol=1e-6)


def test_a_grid_refuses_sources_for_cells_it_does_not_hold(default_model, cell):
    from napari_cytodiffusion.core.tasks.explain import explain_grid

    stack = (np.stack([cell, cell[::-1]]) * 255).astype(np.uint8)
    with pytest.raises(ValueError, match=r"not in the set: \[5\]"):
        explain_grid(
            stack, default_model, sources={0: "neutrophil", 5: "monocyte"}, rbc_diameter=16
        )


def test_figures_render(explanation, cell, tmp_path):
    figure = counterfactual.cell_maps_figure(cell, explanation, {"eosinophil": cell})
    figure.savefig(tmp_path / "cell.png")
    # The title sits above the column headers, not over them.
    renderer = FigureCanvasAgg(figure).get_renderer()
    title = figure.texts[0].get_window_extent(renderer)
    headers = [axis.title.get_window_extent(renderer) for axis in figure.axes]
    assert title.y0 >= max(header.y1 for header in headers)
    grid = np.random.default_rng(0).random((8, 8, 64, 64)).astype(np.float32)
    counts = np.array([0, 1, 2, 0, 0, 0, 3, 0])
    counterfactual.grid_figure(grid, counts, np.zeros((8, 64, 64, 3)), CLASSES).savefig(
        tmp_path / "grid.png"
    )
    assert Image.open(tmp_path / "cell.png").size[0] > Image.open(tmp_path / "cell.png").size[1]
    assert Image.open(tmp_path / "grid.png").size[0] > 600


def test_heat_overlay_leaves_pixels_outside_the_crop_alone():
    rgb = np.full((20, 20, 3), 0.5, np.float32)
    heat = np.full((20, 20), np.nan, np.float32)
    heat[5:10, 5:10] = np.linspace(0, 1, 25).reshape(5, 5)
    out = counterfactual.heat_overlay(rgb, heat)
    np.testing.assert_array_equal(out[0], rgb[0])
    assert not np.allclose(out[9, 9], rgb[9, 9])


def test_counterfactual_command(cell, tmp_path, capsys):
    # A single-cell image: the synthetic cell on a wider background, as a PNG.
    image = np.broadcast_to(REFERENCE_BACKGROUND, (120, 120, 3)).copy()
    image[28:92, 28:92] = cell
    path = tmp_path / "cell.png"
    Image.fromarray((image * 255).astype(np.uint8)).save(path)
    out = tmp_path / "out"
    argv = ["counterfactual", str(path), "--target", "eosinophil", "--out", str(out)]
    options = ["--trials", "2", "--steps", "4", "--rbc-diameter", "25.6", "--device", "cpu"]
    assert cli.main(argv + options) == 0
    heat = np.load(out / "heatmap.npy")
    assert heat.shape == (120, 120)
    # One image pixel per crop pixel at this red-cell diameter: a 64 x 64 footprint.
    assert np.isfinite(heat).sum() == pytest.approx(64 * 64, rel=0.05)
    assert np.load(out / "heatmap_crop.npy").shape == (64, 64)
    assert np.load(out / "counterfactual.npy").shape == (64, 64, 3)
    from napari_cytodiffusion.core.tasks.explain import EXPLANATION_FILES

    assert sorted(path.name for path in out.iterdir()) == sorted(EXPLANATION_FILES)
    printed = capsys.readouterr().out
    assert "-> eosinophil" in printed and "smear field" not in printed  # 4.7 red cells across

    # The same image taken at a tenth of the scale is as wide as a smear field: the central
    # cell is explained, and the output says how to pick a cell.
    far = ["--trials", "2", "--steps", "4", "--rbc-diameter", "5", "--device", "cpu"]
    assert cli.main([*argv[:-1], str(tmp_path / "far"), *far]) == 0
    assert "24 red cells across, a smear field" in capsys.readouterr().out


def test_counterfactual_command_needs_both_segment_and_cell_id(tmp_path, capsys):
    argv = [
        "counterfactual",
        "x.png",
        "--target",
        "eosinophil",
        "--out",
        str(tmp_path),
        "--cell-id",
        "3",
    ]
    assert cli.main(argv) == cli.USAGE_ERROR
    assert "--segment and --cell-id go together" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "segment"), [("cbc_lymphocyte", True), ("pbc_lymphocyte", False)])
def test_explain_calls_a_cell_as_classify_does(default_model, name, segment):
    # The same crop, colours and seed: the same call, domain shift and review flag.
    from napari_cytodiffusion._sample_data import sample_path
    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.tasks.classify import classify
    from napari_cytodiffusion.core.tasks.explain import ExplainRequest, explain

    image = read_image(sample_path(name))
    classified = classify(image, default_model, segment=segment)
    cell_id = classified.cell_ids[0]
    request = ExplainRequest("lymphocyte", cell_id=cell_id, segment=segment, trials=1, steps=1)
    explained = explain(image, default_model, request)
    np.testing.assert_allclose(explained.crop, classified.crops[0], atol=1e-6)
    call, expected = explained.call, classified.calls[0]
    assert call.label == expected.label
    assert call.probabilities == pytest.approx(expected.probabilities, abs=1e-6)
    assert call.domain_shift == pytest.approx(expected.domain_shift)
    assert (call.needs_review, call.why) == (expected.needs_review, expected.why)
    assert ("NEEDS REVIEW" in explained.source_note()) == expected.needs_review


def test_counterfactual_replaces_earlier_maps_only_when_asked(tmp_path, capsys, monkeypatch):
    from napari_cytodiffusion._sample_data import sample_path

    earlier = tmp_path / "heatmap.png"
    earlier.write_text("an earlier run's map")

    def loading(*_):
        raise RuntimeError("loading the model")  # the work starts here: far enough

    monkeypatch.setattr(cli, "_load_model", loading)
    argv = ["counterfactual", str(sample_path("pbc_lymphocyte")), "--target", "monocyte"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == cli.USAGE_ERROR
    err = capsys.readouterr().err
    assert f"{earlier} exists, from an earlier run" in err and "(--overwrite)" in err
    assert cli.main([*argv, "--out", str(tmp_path), "--overwrite"]) == cli.USAGE_ERROR
    assert "loading the model" in capsys.readouterr().err
    assert earlier.read_text() == "an earlier run's map"


def _calls_row(label, p, needs_review, why, annotated=""):
    """A cell's row of a calls table, as Classify cells' classes layer holds it."""
    row = {"index": 5, "label": annotated or label, "predicted": label, "annotated": annotated}
    row.update({f"p_{name}": p if name == label else (1 - p) / 7 for name in CLASSES})
    row.update(uncertainty=0.4, anomaly_score=0.1, needs_review=needs_review, why=why)
    return row


def test_the_current_class_says_where_it_came_from(default_model, cell):
    """A table's row gives the cell's current class without calling it again: the
    classifier's call it records (its p and review flag), or a person's call; a source
    given is as given."""
    from napari_cytodiffusion.core.tasks.explain import ExplainRequest, explain

    def note(**request):
        options = {"trials": 1, "steps": 1, "strength": 0.1}
        return explain(cell, default_model, ExplainRequest("eosinophil", **request, **options))

    flagged = note(row=_calls_row("neutrophil", 0.61, True, "uncertain"))
    assert flagged.maps.source == "neutrophil" and flagged.call.needs_review
    assert flagged.source_note().startswith(
        "neutrophil: the classifier's call, p = 0.61, NEEDS REVIEW (uncertain)"
    )
    person = note(row=_calls_row("neutrophil", 0.61, False, "", annotated="monocyte"))
    assert person.source_note().startswith("monocyte: a person's label")
    assert "the quick best fit of these trials" in person.source_note()  # not a monocyte
    given = note(source="lymphocyte", row=_calls_row("neutrophil", 0.61, False, ""))
    assert given.source_note().startswith("lymphocyte: as given")


def _smear_with_two_cells(cell):
    """A 'smear' holding ``cell`` at the model's scale (cell 5) and an empty disc (cell 6)."""
    image = np.broadcast_to(REFERENCE_BACKGROUND, (100, 200, 3)).copy()
    image[18:82, 18:82] = cell
    rows, cols = np.ogrid[:100, :200]
    labels = np.zeros((100, 200), np.uint16)
    labels[(rows - 50) ** 2 + (cols - 50) ** 2 < 15**2] = 5
    labels[(rows - 50) ** 2 + (cols - 150) ** 2 < 15**2] = 6
    return image, labels


def test_a_cell_a_person_deleted_is_refused_saying_so(default_model, cell):
    from napari_cytodiffusion.core.annotations import Annotations, CellAnnotation
    from napari_cytodiffusion.core.tasks.explain import ExplainRequest, explain

    image, labels = _smear_with_two_cells(cell)
    deleted = Annotations("smear.png", (100, 200), [CellAnnotation((50, 50), "deleted")])
    request = ExplainRequest("eosinophil", cell_id=5, labels=labels, annotations=deleted)
    with pytest.raises(ValueError, match="No cell with label 5") as refused:
        explain(image, default_model, request)
    assert "a person deleted it" in str(refused.value) and "click" not in str(refused.value)
    assert "smear.png.annotations.json" in str(refused.value)
    # A cell that is not there: nothing a terminal user cannot do.
    with pytest.raises(ValueError, match="No cell with label 9") as missing:
        explain(image, default_model, ExplainRequest("eosinophil", cell_id=9, labels=labels))
    assert "click" not in str(missing.value)


def test_a_grid_of_a_smear_applies_a_persons_review(default_model, cell):
    """Deleted cells are left out, a person's label is the cell's current class."""
    from napari_cytodiffusion.core.annotations import Annotations, CellAnnotation
    from napari_cytodiffusion.core.tasks.explain import explain_grid

    image, labels = _smear_with_two_cells(cell)
    review = Annotations(
        "smear.png",
        (100, 200),
        [CellAnnotation((50, 50), "monocyte"), CellAnnotation((50, 150), "deleted")],
    )
    grid = explain_grid(
        image,
        default_model,
        labels=labels,
        sources={6: "neutrophil"},  # a row the deletion outlived: passed over
        trials=1,
        rbc_diameter=25.6,
        annotations=review,
    )
    assert grid.cells == 1 and grid.counts[CLASSES.index("monocyte")] == 1
