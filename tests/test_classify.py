"""The diffusion classifier: pairing, adaptive pruning, calibration, image-level analysis."""

import numpy as np
import pytest

from napari_cytodiffusion.core.model.classifier import (
    MAX_TRIALS,
    TIMESTEP_RANGE,
    class_errors,
    classify_crops,
    prune,
    replay_adaptive,
    trial_timesteps,
)

# One PBC val image per class that the shipped model calls confidently.
EXAMPLES = {
    "eosinophil": "eosinophil/EO_135534.jpg",
    "lymphocyte": "lymphocyte/LY_962298.jpg",
    "platelet": "platelet/PLATELET_108287.jpg",
    "neutrophil": "neutrophil/SNE_790562.jpg",
}


@pytest.fixture(scope="module")
def pbc_crops(pbc_dir):
    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.smear.crops import normalised_cell

    crops = [normalised_cell(read_image(pbc_dir / path), 64, 29.0) for path in EXAMPLES.values()]
    return np.stack(crops), list(EXAMPLES)


def test_trial_timesteps_cover_the_range_from_the_first_trials():
    steps = trial_timesteps(MAX_TRIALS)
    assert len(set(steps.tolist())) == MAX_TRIALS
    assert steps.min() >= TIMESTEP_RANGE[0] and steps.max() <= TIMESTEP_RANGE[1]
    first_four = np.sort(trial_timesteps(4))
    # Every prefix spreads over the range: the first four trials span more than half of it.
    assert first_four[-1] - first_four[0] > 0.5 * (TIMESTEP_RANGE[1] - TIMESTEP_RANGE[0])


def test_prune_drops_only_clearly_worse_classes(default_model):
    errors = np.full((1, 4, 8), 0.02, np.float32)
    errors[0, :, 3] = 0.001  # class 3 explains the cell far better on every trial
    errors[0, :, 5] = 0.00101  # class 5 is as good: it must survive
    alive = prune(default_model, errors, np.ones((1, 8), bool))
    assert alive[0, 3] and alive[0, 5]
    assert alive[0].sum() == 2


def test_classifier_calls_real_cells(default_model, pbc_crops):
    crops, truth = pbc_crops
    calls = classify_crops(default_model, crops, budget=8, seed=0)
    assert [c.label for c in calls] == truth
    for call in calls:
        assert sum(call.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
        assert call.probabilities[call.label] == max(call.probabilities.values())
        assert 0.0 <= call.uncertainty <= 1.0
        assert 8 <= call.unet_evals <= 8 * 8  # one trial of every class at least


def test_adaptive_is_reproducible_and_matches_its_replay(default_model, pbc_crops):
    crops, _ = pbc_crops
    live, spent = class_errors(default_model, crops, "adaptive", seed=3, budget=6)
    again, _ = class_errors(default_model, crops, "adaptive", seed=3, budget=6)
    np.testing.assert_array_equal(np.isnan(live), np.isnan(again))
    np.testing.assert_allclose(live, again, rtol=1e-5)
    full, full_spent = class_errors(default_model, crops, "exhaustive", seed=3, budget=6)
    assert np.all(full_spent == 6 * 8) and not np.isnan(full).any()
    replayed, replay_spent = replay_adaptive(default_model, full)
    np.testing.assert_array_equal(np.isnan(replayed), np.isnan(live))
    np.testing.assert_allclose(replayed[~np.isnan(live)], live[~np.isnan(live)], rtol=1e-4)
    np.testing.assert_array_equal(replay_spent, spent)
    assert spent.mean() < full_spent.mean()


def test_null_class_can_be_scored_alongside(default_model, pbc_crops):
    crops, _ = pbc_crops
    errors, spent = class_errors(default_model, crops[:1], "exhaustive", budget=2, classes=[0, 8])
    assert errors.shape == (1, 2, 2) and spent[0] == 4


def test_wrong_crops_are_refused_with_a_clear_message(default_model):
    with pytest.raises(ValueError, match="shape"):
        classify_crops(default_model, np.zeros((2, 32, 32, 3)))
    with pytest.raises(ValueError, match="strategy"):
        classify_crops(default_model, np.zeros((1, 64, 64, 3)), strategy="fast")


def test_calibration_is_fitted_from_validation_errors(default_model):
    import copy

    from napari_cytodiffusion.core.model.calibration import fit_calibration

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(8), 12)
    errors = rng.normal(0.02, 0.001, (len(labels), 8, 8)).astype(np.float32)
    errors[np.arange(len(labels)), :, labels] -= 0.002  # the true class fits better
    model = copy.copy(default_model)
    calibration = fit_calibration(model, np.abs(errors), labels)
    assert len(calibration["class_bias"]) == 8 and calibration["class_bias"][-1] == 0.0
    assert calibration["inverse_temperature"] > 0
    assert 0.0 <= calibration["uncertainty_threshold"] <= 1.0
    assert np.isfinite(calibration["anomaly_threshold"])
    assert len(calibration["class_log_error_mean"]) == 8


def test_single_cell_image_is_classified_end_to_end(default_model, pbc_dir):
    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.tasks.classify import calls_table, classify

    result = classify(read_image(pbc_dir / EXAMPLES["lymphocyte"]), default_model, segment=False)
    assert result.cell_ids == [None] and len(result.calls) == 1
    assert result.calls[0].label == "lymphocyte"
    assert 25 < result.rbc_diameter < 33  # PBC's red cells are about 29 px
    table = calls_table(result.calls, [1])
    assert {"index", "label", "uncertainty", "anomaly_score", "needs_review"} <= set(table)
    assert {f"p_{c}" for c in default_model.classes} <= set(table)


def test_a_batch_of_single_cell_images_shares_one_scale(pbc_dir):
    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.smear.image import to_rgb_float
    from napari_cytodiffusion.core.smear.scale import estimate_rbc_diameter
    from napari_cytodiffusion.core.tasks.classify import shared_rbc_diameter

    # A large eosinophil once outvoted the red cells of its own image (an estimate above
    # 45 px); with one chromatin measure shared by the scale estimate and the segmentation,
    # its white cell is left out of the vote and the red cells are measured.
    eosinophil = pbc_dir / EXAMPLES["eosinophil"]
    assert 25 < estimate_rbc_diameter(to_rgb_float(read_image(eosinophil))) < 33
    # The median over images of the same scanner is right.
    paths = [pbc_dir / path for path in EXAMPLES.values()] + [pbc_dir / "missing.jpg"]
    assert 26 < shared_rbc_diameter(paths) < 32


def test_given_labels_are_classified_at_their_centroids(default_model, pbc_dir):
    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.tasks.classify import classify, differential_count

    image = read_image(pbc_dir / EXAMPLES["lymphocyte"])
    labels = np.zeros(image.shape[:2], np.uint32)
    labels[60:100, 60:100] = 7  # the central lymphocyte
    result = classify(image, default_model, labels=labels, rbc_diameter=29.0)
    assert result.cell_ids == [7]
    np.testing.assert_allclose(result.centres[0], [79.5, 79.5])
    counts = differential_count([c.label for c in result.calls], default_model.classes)
    assert counts["count"].sum() == 1 and counts["percent"].max() == 100.0
    with pytest.raises(ValueError, match="do not match"):
        classify(image, default_model, labels=labels[:10])
