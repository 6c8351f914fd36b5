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


def test_adaptive_is_reproducible_and_matches_its_replay(default_model, pbc_crops, float32_network):
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


def test_the_network_runs_in_bfloat16_only_where_the_cpu_computes_in_it(monkeypatch):
    import torch

    from napari_cytodiffusion.core.model.diffusion import FLOAT32_ENV, autocast, network_dtype

    cpu = torch.device("cpu")
    monkeypatch.delenv(FLOAT32_ENV, raising=False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": False, "avx2": True})
    assert network_dtype(cpu) == torch.float32
    with autocast(cpu):
        assert not torch.is_autocast_enabled("cpu")
    for units in ("amx_bf16", "avx512_bf16"):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda units=units: {units: True})
        with autocast(cpu):
            assert torch.is_autocast_enabled("cpu")
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    monkeypatch.setenv(FLOAT32_ENV, "1")  # the user's way to keep float32
    assert network_dtype(cpu) == network_dtype(torch.device("cuda")) == torch.float32


def test_bfloat16_autocast_keeps_the_calls(default_model, pbc_crops, monkeypatch):
    from napari_cytodiffusion.core.model import diffusion

    crops, truth = pbc_crops
    monkeypatch.setenv(diffusion.FLOAT32_ENV, "1")
    precise = classify_crops(default_model, crops, budget=8, seed=0)
    monkeypatch.delenv(diffusion.FLOAT32_ENV)
    # Forced on, so this also runs (emulated, slower) on CPUs without bfloat16 units.
    monkeypatch.setattr(diffusion, "_cpu_computes_in_bfloat16", lambda: True)
    rounded = classify_crops(default_model, crops, budget=8, seed=0)
    assert [c.label for c in rounded] == [c.label for c in precise] == truth
    for a, b in zip(precise, rounded, strict=True):
        assert a.probabilities == pytest.approx(b.probabilities, abs=0.05)
        assert a.uncertainty == pytest.approx(b.uncertainty, abs=0.05)
        assert a.probabilities != b.probabilities  # the two runs did differ in precision


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


def test_a_few_cells_that_are_all_right_do_not_make_every_call_certain(default_model):
    import copy

    from napari_cytodiffusion.core.model.calibration import fit_calibration

    # Two cells of each of four classes, every one clearly best under its own class.
    rng = np.random.default_rng(1)
    labels = np.repeat([1, 4, 5, 6], 2)
    errors = rng.normal(0.02, 0.001, (len(labels), 16, 8)).astype(np.float32)
    errors[np.arange(len(labels)), :, labels] -= 0.004
    base = default_model.calibration
    # Without the base model's temperature to lean on, eight easy cells make every call
    # surer than the thousands of cells of the base model's calibration did.
    unanchored = {
        key: value
        for key, value in base.items()
        if key not in ("inverse_temperature", "uncertainty_threshold")
    }
    alone = fit_calibration(copy.copy(default_model), np.abs(errors), labels, base=unanchored)
    assert alone["inverse_temperature"] > 2 * base["inverse_temperature"]
    adapted = fit_calibration(copy.copy(default_model), np.abs(errors), labels, base=base)
    assert adapted["inverse_temperature"] == pytest.approx(base["inverse_temperature"], rel=0.1)
    # The review threshold is never more lenient than the base's.
    strict = {**base, "uncertainty_threshold": 1e-30}
    fitted = fit_calibration(copy.copy(default_model), np.abs(errors), labels, base=strict)
    assert alone["uncertainty_threshold"] > 1e-30 and fitted["uncertainty_threshold"] == 1e-30


def test_a_labs_adapting_cells_join_the_class_bias_fit(default_model):
    import copy

    from napari_cytodiffusion.core.model.calibration import fit_calibration

    rng = np.random.default_rng(2)
    classes = [1, 4, 5, 6]

    def cells(per_class, trials, head_start):
        labels = np.repeat(classes, per_class)
        errors = rng.normal(0.02, 0.001, (len(labels), trials, 8)).astype(np.float32)
        errors[np.arange(len(labels)), :, labels] -= 0.003
        errors[:, :, 4] -= head_start  # class 4's denoiser is better on every cell
        return np.abs(errors), labels

    # Two held-back cells a class hide the head start that 20 adapting cells a class show.
    held_errors, held_labels = cells(2, 32, 0.0)
    base = default_model.calibration
    alone = fit_calibration(copy.copy(default_model), held_errors, held_labels, base=base)
    joined = fit_calibration(
        copy.copy(default_model),
        held_errors,
        held_labels,
        base=base,
        bias_cells=cells(20, 16, 0.002),
    )
    # Scores are errors minus the bias: a head start is taken back by a lower bias (in units
    # of the per-timestep spread, about 0.001 here).
    gap = [c["class_bias"][4] - c["class_bias"][5] for c in (alone, joined)]
    assert gap[1] < gap[0] - 0.5
    assert joined["fitted_on"] == alone["fitted_on"]  # the rest is the held-back cells'


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


def test_a_dimmer_exposure_is_not_an_unfamiliar_smear(default_model):
    from napari_cytodiffusion._sample_data import sample_path
    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.tasks.classify import classify

    # White balance divides the lamp's brightness out of every crop, and the domain-shift
    # score must not count it either: a dimmer lamp once tripled a CBC field's shift, which
    # made its calls near uniform.
    def both(name, segment):
        image = read_image(sample_path(name)).astype(np.float64)
        return [
            classify((factor * image).round().astype(np.uint8), default_model, segment=segment)
            for factor in (1.0, 0.6)
        ]

    bright, dim = both("cbc_monocyte_eosinophil", segment=True)
    assert len(dim.calls) == len(bright.calls) == 2
    for a, b in zip(bright.calls, dim.calls, strict=True):
        assert b.domain_shift == pytest.approx(a.domain_shift, rel=0.05)
    bright, dim = both("pbc_lymphocyte", segment=False)
    assert dim.calls[0].label == bright.calls[0].label == "lymphocyte"
    top = bright.calls[0].probabilities["lymphocyte"]
    assert dim.calls[0].probabilities["lymphocyte"] == pytest.approx(top, abs=0.05)


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


def test_a_batch_mixing_scanners_shares_a_scale_only_within_each_scanner(pbc_dir, tmp_path):
    from napari_cytodiffusion._sample_data import SAMPLE_FOLDER
    from napari_cytodiffusion.core.tasks.classify import batch_rbc_diameters

    # Once, one median over the batch cropped the bundled PBC lymphocyte at CBC's scale (about
    # three times too coarse) when the three samples were classified together: erythroblast.
    samples = sorted(SAMPLE_FOLDER.glob("*.jpg"))
    assert batch_rbc_diameters(samples) == [None] * 3  # groups of 2 and 1 measure alone
    cbc_fields = [path for path in samples if path.name.startswith("cbc")]
    pbc_cells = [pbc_dir / path for path in EXAMPLES.values()]
    unreadable = tmp_path / "notes.jpg"
    unreadable.write_text("not an image")
    paths = [*cbc_fields, *pbc_cells, cbc_fields[0], unreadable]
    scales = batch_rbc_diameters(paths)
    assert all(26 < scale < 32 for scale in scales[2:-2])
    assert scales[0] == scales[1] == scales[-2] > 60  # CBC's red cells are about 90 px
    assert scales[-1] is None


def _tight_white_cell(radius):
    """A tight crop around one white cell: no red cells to measure the scale on."""
    rows, cols = np.mgrid[:120, :120]
    image = np.empty((120, 120, 3))
    image[:] = (0.95, 0.9, 0.85)
    distance = np.hypot(rows - 60, cols - 60)
    image[distance < radius] = (0.8, 0.68, 0.8)
    image[distance < 0.6 * radius] = (0.4, 0.2, 0.55)
    return (image * 255).astype(np.uint8)


def test_an_adapted_model_gives_its_labs_scale_to_images_without_red_cells(default_model):
    from dataclasses import replace

    from napari_cytodiffusion.core.smear.image import to_rgb_float
    from napari_cytodiffusion.core.smear.prepare import prepare_smear
    from napari_cytodiffusion.core.smear.scale import RED_CELLS, WHITE_CELL, estimate_scale
    from napari_cytodiffusion.core.tasks.classify import classify

    small, large = _tight_white_cell(18), _tight_white_cell(30)
    # On its own, each image's scale comes from its white cell: a small cell gets a small
    # scale, so in the crops both cells would look the same size.
    own = [estimate_scale(to_rgb_float(image)) for image in (small, large)]
    assert {estimate.source for estimate in own} == {WHITE_CELL}
    assert own[0].diameter < 0.75 * own[1].diameter
    # A model adapted to a lab knows that lab's scale and uses it for both.
    lab_model = replace(default_model, metadata={**default_model.metadata, "rbc_diameter": 24.0})
    assert lab_model.lab_rbc_diameter == 24.0 and default_model.lab_rbc_diameter is None
    for image in (small, large):
        assert classify(image, lab_model, strategy="adaptive").smear.rbc_diameter == 24.0
    # A given scale still wins, and an image with red cells to measure keeps its own.
    assert classify(small, lab_model, rbc_diameter=30.0).smear.rbc_diameter == 30.0
    field = _red_cell_field(diameter=18)
    measured = estimate_scale(to_rgb_float(field))
    assert measured.source == RED_CELLS and 15 < measured.diameter < 21
    kept = prepare_smear(field, fallback_rbc_diameter=40.0)
    assert kept.rbc_diameter == measured.diameter and kept.scale_source == RED_CELLS


def _red_cell_field(diameter):
    rows, cols = np.mgrid[:200, :200]
    image = np.empty((200, 200, 3))
    image[:] = (0.95, 0.9, 0.85)
    centres = np.mgrid[15:200:30, 15:200:30].reshape(2, -1).T
    for r, c in centres + np.random.default_rng(0).uniform(-4, 4, centres.shape):
        image[np.hypot(rows - r, cols - c) < diameter / 2] = (0.85, 0.55, 0.55)
    return (image * 255).astype(np.uint8)


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


def test_the_differential_is_per_100_leukocytes():
    from napari_cytodiffusion.core.classes import CLASSES
    from napari_cytodiffusion.core.report import percent_text
    from napari_cytodiffusion.core.tasks.classify import differential_count

    calls = ["neutrophil"] * 3 + ["lymphocyte", "erythroblast", "platelet", "platelet"]
    counts = differential_count(calls, CLASSES).set_index("class")
    inside = counts[counts["in_differential"]]
    assert inside["percent"].sum() == pytest.approx(100.0)
    assert counts.loc["neutrophil", "percent"] == pytest.approx(75.0)
    # Nucleated red cells per 100 white cells, as haematology reports them.
    assert counts.loc["erythroblast", "percent"] == pytest.approx(25.0)
    assert not counts.loc["platelet", "in_differential"]
    only_platelets = differential_count(["platelet"], CLASSES).set_index("class")
    assert np.isnan(only_platelets.loc["platelet", "percent"])  # per 100 of none
    assert percent_text(only_platelets.loc["platelet", "percent"]) == "-"  # shown, not "nan"


# ----------------------------------------------------------------------------- issue 9


def test_the_null_class_runs_alongside_without_changing_the_calls(
    default_model, pbc_crops, float32_network
):
    from napari_cytodiffusion.core.model.classifier import ANOMALY_TRIALS, calls_from_errors

    crops, _ = pbc_crops
    plain, plain_spent = class_errors(default_model, crops, "adaptive", seed=1, budget=8)
    live, spent = class_errors(default_model, crops, "adaptive", seed=1, budget=8, null=True)
    assert live.shape == (len(crops), 8, 9)
    np.testing.assert_allclose(live[:, :, :8][~np.isnan(plain)], plain[~np.isnan(plain)], rtol=1e-4)
    # The null class is scored on every trial the best class is, and on at least 6.
    best = np.array(
        [
            default_model.classes.index(c.label)
            for c in calls_from_errors(default_model, plain, plain_spent)
        ]
    )
    rows = np.arange(len(crops))
    both = ~np.isnan(live[rows, :, best]) & ~np.isnan(live[:, :, 8])
    assert (both.sum(axis=1) >= ANOMALY_TRIALS).all()
    assert (spent > plain_spent).all()
    a = calls_from_errors(default_model, plain, plain_spent)
    b = calls_from_errors(default_model, live, spent)
    assert [c.label for c in a] == [c.label for c in b]
    for x, y in zip(a, b, strict=True):
        assert x.probabilities == pytest.approx(y.probabilities, abs=1e-3)
    full, _ = class_errors(default_model, crops, "exhaustive", seed=1, budget=8, null=True)
    replayed, replay_spent = replay_adaptive(default_model, full)
    np.testing.assert_array_equal(np.isnan(replayed), np.isnan(live))
    np.testing.assert_allclose(replayed[~np.isnan(live)], live[~np.isnan(live)], rtol=1e-4)
    np.testing.assert_array_equal(replay_spent, spent)


def _toy_errors(rng, n=40, trials=12, k=4, scale=1.0):
    """Errors where each cell's true class beats the null class by about 5 %."""
    labels = np.repeat(np.arange(k), n // k)
    base = rng.lognormal(np.log(0.02), 0.3, (n, 1, 1)) * scale
    errors = base * rng.lognormal(0, 0.02, (n, trials, k + 1))
    errors[np.arange(n), :, labels] *= 0.95
    errors[:, :, -1] *= 1.0
    return errors.astype(np.float64), labels


def test_null_gain_cancels_the_images_own_denoising_cost():
    """A smooth image is cheap to denoise for every class and for the null class alike: the
    null-gain score does not move, the best-class error score falls (the confound)."""
    from napari_cytodiffusion.core.model import anomaly

    rng = np.random.default_rng(0)
    errors, labels = _toy_errors(rng)
    timesteps = trial_timesteps(errors.shape[1])
    real, null = errors[:, :, :-1], errors[:, :, -1]
    gain = anomaly.fit_reference("null_gain", real, null, labels, timesteps)
    error = anomaly.fit_reference("best_error", real, null, labels, timesteps)
    before = {
        m: anomaly.score(r, real, null, labels, timesteps)
        for m, r in (("gain", gain), ("error", error))
    }
    cheap = errors * 0.5  # every denoiser's error halves on a smoother image
    after = {
        m: anomaly.score(r, cheap[:, :, :-1], cheap[:, :, -1], labels, timesteps)
        for m, r in (("gain", gain), ("error", error))
    }
    np.testing.assert_allclose(after["gain"], before["gain"], atol=1e-9)
    assert (after["error"] < before["error"] - 1).all()
    # A cell that no class explains better than the null class is anomalous.
    unknown = errors.copy()
    unknown[np.arange(len(labels)), :, labels] /= 0.95
    odd = anomaly.score(gain, unknown[:, :, :-1], unknown[:, :, -1], labels, timesteps)
    assert np.median(odd) > np.median(before["gain"]) + 1.5


def test_every_anomaly_score_is_fitted_and_scores_cells():
    from napari_cytodiffusion.core.model import anomaly

    rng = np.random.default_rng(1)
    errors, labels = _toy_errors(rng)
    timesteps = trial_timesteps(errors.shape[1])
    real, null = errors[:, :, :-1], errors[:, :, -1]
    for method in anomaly.METHODS:
        reference = anomaly.fit_reference(method, real, null, labels, timesteps)
        scores = anomaly.score(reference, real, null, labels, timesteps)
        assert scores.shape == (len(labels),) and np.isfinite(scores).all(), method
        assert abs(np.median(scores)) < 1.0, method
    with pytest.raises(ValueError, match="Unknown anomaly score"):
        anomaly.fit_reference("entropy", real, null, labels, timesteps)


def test_review_reasons_are_recorded_per_call(default_model):
    import copy

    from napari_cytodiffusion.core.model.classifier import (
        UNCERTAIN,
        UNFAMILIAR_SMEAR,
        UNKNOWN_KIND,
        calls_from_errors,
    )

    model = copy.copy(default_model)
    errors = np.full((3, 4, 8), 0.02, np.float32)
    errors[0, :, 3] = 0.001  # a clear call
    errors[1, :, 3] = 0.001
    errors[2, :, 3] = 0.0199  # two classes almost alike: uncertain
    shift = np.array([0.2, 3.0, np.nan])
    calls = calls_from_errors(model, errors, np.full(3, 32), domain_shift=shift)
    assert calls[0].why == "" and not calls[0].needs_review
    assert UNFAMILIAR_SMEAR in calls[1].why and calls[1].needs_review
    assert UNCERTAIN in calls[2].why and calls[2].needs_review
    assert UNKNOWN_KIND not in calls[0].why
    calls = calls_from_errors(model, errors, np.full(3, 32), anomaly_threshold=-1e9)
    assert all(UNKNOWN_KIND in c.why for c in calls)
    record = calls[0].as_dict()
    assert {"why", "domain_shift"} <= set(record) and record["domain_shift"] is None


def test_calls_on_unfamiliar_smears_are_not_stated_with_confidence(default_model):
    import copy

    from napari_cytodiffusion.core.model.classifier import calls_from_errors

    errors = np.full((3, 4, 8), 0.02, np.float32)
    errors[:, :, 3] = 0.001  # the same clear call three times
    shift = np.array([0.5, 3.0, np.nan])
    model = copy.copy(default_model)
    reference = {**default_model.calibration["domain"], "trust_decay": 1.0}
    model.calibration = {**default_model.calibration, "domain": reference}
    calls = calls_from_errors(model, errors, np.full(3, 32), domain_shift=shift)
    top = [max(c.probabilities.values()) for c in calls]
    assert {c.label for c in calls} == {default_model.classes[3]}
    assert top[0] > 0.99 and top[2] == top[0]  # familiar or unknown smears: as calibrated
    trust = np.exp(-2.0)  # two thresholds beyond the review threshold
    assert top[1] == pytest.approx(trust * top[0] + (1 - trust) / 8, abs=1e-6)
    assert calls[1].uncertainty > calls[0].uncertainty


def test_the_trust_decay_matches_how_often_shifted_calls_are_right():
    from napari_cytodiffusion.core.model.domain import fit_trust_decay, trusted_probabilities

    rng = np.random.default_rng(0)
    n, k = 400, 8
    truth = rng.integers(0, k, n)
    shift = np.where(np.arange(n) < n // 2, 0.5, 2.0)
    right = (shift < 1) | (rng.random(n) < 0.3)  # shifted calls: 30 % right
    predicted = np.where(right, truth, (truth + 1) % k)
    probabilities = np.full((n, k), 0.03 / (k - 1))
    probabilities[np.arange(n), predicted] = 0.97  # every call stated with confidence
    decay = fit_trust_decay(probabilities, truth, shift)
    trusted = trusted_probabilities(probabilities, shift, decay)
    shifted = shift > 1
    assert trusted[shifted].max(axis=1).mean() == pytest.approx(right[shifted].mean(), abs=0.05)
    assert np.array_equal(trusted[~shifted], probabilities[~shifted])
    assert np.array_equal(trusted.argmax(axis=1), predicted)
    assert fit_trust_decay(probabilities, predicted, shift) == 0.0  # all right: trusted


def test_a_cell_too_large_for_its_called_class_is_flagged(default_model, pbc_crops):
    from napari_cytodiffusion.core.model.cell_size import central_chromatin_area
    from napari_cytodiffusion.core.model.classifier import TOO_LARGE, calls_from_errors

    crops, names = pbc_crops
    areas = dict(zip(names, central_chromatin_area(crops), strict=True))
    largest = default_model.calibration["size"]["largest"]
    # Real cells measure as their kind: a platelet is well under a red cell's area of
    # chromatin, a lymphocyte over one, and each is within its own class's bound.
    assert 0.2 < areas["platelet"] < 1.0 < areas["lymphocyte"]
    assert all(areas[name] < largest[name] for name in names)
    # A large lymphocyte called a platelet (as defocus or heavy JPEG make the model do), and
    # called a lymphocyte.
    assert largest["platelet"] < 1.5 * largest["platelet"] < largest["lymphocyte"]
    errors = np.full((2, 4, 8), 0.02, np.float32)
    platelet, lymphocyte = (default_model.classes.index(c) for c in ("platelet", "lymphocyte"))
    errors[0, :, platelet] = errors[1, :, lymphocyte] = 0.001
    area = np.full(2, 1.5 * largest["platelet"])
    calls = calls_from_errors(default_model, errors, np.full(2, 32), chromatin_area=area)
    assert calls[0].label == "platelet" and calls[0].why == TOO_LARGE and calls[0].size_ratio > 1
    assert calls[1].label == "lymphocyte" and calls[1].why == "" and calls[1].size_ratio < 1
    assert calls_from_errors(default_model, errors, np.full(2, 32))[0].why == ""  # not measured


def test_domain_shift_ranks_shifted_cells_above_training_cells():
    from napari_cytodiffusion.core.model.domain import domain_parts, fit_domain_reference

    rng = np.random.default_rng(0)
    mix = rng.normal(size=(40, 60))
    train = rng.normal(size=(400, 40)) @ mix
    val = rng.normal(size=(200, 40)) @ mix
    colours = rng.normal([1.0, 0.89, 0.8, 0.18, 0.26, 0.18, 0.5, 0.84, 0.2], 0.01, (400, 9))
    colours[::10, 3:6] = np.nan  # red cells not found in some images
    reference = fit_domain_reference(train, colours, val, colours[:200])
    cell, smear = domain_parts(reference, val, colours[:200])
    assert np.mean(cell > 1) <= 0.02 and np.nanmean(smear > 1) <= 0.02
    shifted = val + 3 * rng.normal(size=val.shape)  # texture unlike any training cell
    tinted = colours[:200].copy()
    tinted[:, :3] = (0.80, 0.81, 0.80)  # another lamp
    cell2, smear2 = domain_parts(reference, shifted, tinted)
    assert np.mean(cell2 > 1) > 0.9 and np.mean(smear2 > 1) > 0.9


def test_a_lab_sized_reference_without_colours_has_a_cell_part_only():
    from napari_cytodiffusion.core.model.domain import (
        CELLS_PER_COMPONENT,
        domain_parts,
        fit_domain_reference,
    )

    rng = np.random.default_rng(2)
    mix = rng.normal(size=(10, 300))

    def cells(n):
        return rng.normal(size=(n, 10)) @ mix + rng.normal(0, 0.3, (n, 300))

    train, val = cells(60), cells(26)
    reference = fit_domain_reference(train, None, val, None)
    # 60 cells support 15 components, not the 32 of a full training split.
    assert len(reference["features"]["components"]) == 60 // CELLS_PER_COMPONENT
    assert "colour" not in reference
    colours = np.ones((26, 9))  # given colours are not used without a colour reference
    cell, smear = domain_parts(reference, val, colours)
    assert np.isnan(smear).all() and np.mean(cell > 1) <= 0.05
    other_lab = cells(26) + rng.normal(0, 1.0, (26, 300))
    assert np.mean(domain_parts(reference, other_lab)[0] > 1) > 0.9


def test_a_soft_cell_is_unlike_the_training_smears_a_sharper_one_is_not():
    from scipy import ndimage as ndi

    from napari_cytodiffusion.core.model.domain import (
        crop_sharpness,
        domain_parts,
        fit_domain_reference,
    )

    rng = np.random.default_rng(1)
    textures = ndi.gaussian_filter(rng.random((300, 64, 64, 3)), (0, 0.5, 0.5, 0))
    sharpness = crop_sharpness(textures)
    features = rng.normal(size=(300, 8))
    colours = np.tile([1.0, 0.89, 0.8, 0.18, 0.26, 0.18, 0.5, 0.84, 0.2], (300, 1))
    train, val = slice(0, 200), slice(200, 300)
    reference = fit_domain_reference(
        *(features[train], colours[train], features[val], colours[val]),
        *(sharpness[train], sharpness[val]),
    )
    soft = ndi.gaussian_filter(textures[200:], (0, 1.0, 1.0, 0))
    sharp = textures[200:] + rng.normal(0, 0.05, textures[200:].shape)
    as_seen, _ = domain_parts(reference, features[200:], sharpness=sharpness[200:])
    softer, _ = domain_parts(reference, features[200:], sharpness=crop_sharpness(soft))
    sharper, _ = domain_parts(reference, features[200:], sharpness=crop_sharpness(sharp))
    assert np.mean(as_seen > 1) <= 0.02
    assert np.all(softer > 1)  # defocus: the part is one-sided ...
    assert np.mean(sharper > 1) <= 0.02  # ... extra detail is the encoder features' business


def test_the_shipped_model_flags_a_defocused_pbc_cell(default_model, pbc_crops):
    # Blurred by 1.5 model pixels, PBC cells were called platelets with confidence on the
    # whole band (0.36 balanced accuracy in benchmarks/perturbations.py); the sharpness part
    # must say the cell is unlike the training cells however it is scored.
    from scipy import ndimage as ndi

    from napari_cytodiffusion.core.model.domain import domain_scores

    crops, _ = pbc_crops
    blurred = ndi.gaussian_filter(crops, (0, 1.5, 1.5, 0))
    shift, _ = domain_scores(default_model, crops)
    assert np.all(shift < 1)
    shift, softness = domain_scores(default_model, blurred)
    assert np.all(shift > 1) and np.all(softness > 1)


def test_stain_normalisation_undoes_a_stain_change_and_leaves_pbc_alone(pbc_dir):
    import torch

    from napari_cytodiffusion.core.io import read_image
    from napari_cytodiffusion.core.model import augment
    from napari_cytodiffusion.core.smear.normalise import mapping_weight
    from napari_cytodiffusion.core.smear.prepare import prepare_smear

    image = read_image(pbc_dir / EXAMPLES["neutrophil"])
    smear = prepare_smear(image, 29.0)
    assert mapping_weight(smear.colour_map.rbc_density, smear.colour_map.nucleus_direction) == 0
    assert smear.colour_map.is_white_balance  # a typical PBC image is only white-balanced
    # The same cell in another lab: 40 % of the red dye, the blue dye's hue turned by 15
    # degrees, under a yellower lamp.
    x = torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)[None]
    basis = augment._stain_basis("cpu")
    background = augment._background("cpu")
    density = -torch.log((x / background).clamp(1e-3, None))
    amounts = torch.einsum("ij,njhw->nihw", torch.linalg.inv(basis), density)
    amounts[:, 0] *= 0.4
    turn = augment._rotation(torch.tensor([[2.0, -2.0, 1.0]]) / 3, torch.tensor([0.26]))[0]
    other_basis = basis.clone()
    other_basis[:, 1] = turn @ basis[:, 1]
    other = background * torch.exp(-torch.einsum("ij,njhw->nihw", other_basis, amounts))
    other = other * torch.tensor([1.0, 0.97, 0.85]).view(1, 3, 1, 1)
    other = (other[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)
    reference = smear.colour_map.apply(np.asarray(smear.rgb))
    white = prepare_smear(other, 29.0, normalisation="white-balance")
    mapped = prepare_smear(other, 29.0)
    assert not mapped.colour_map.is_white_balance
    error_white = np.abs(white.colour_map.apply(np.asarray(white.rgb)) - reference).mean()
    error_mapped = np.abs(mapped.colour_map.apply(np.asarray(mapped.rgb)) - reference).mean()
    assert error_mapped < 0.8 * error_white


def test_the_low_band_is_a_gaussian_blur_of_the_error():
    import torch
    from scipy import ndimage as ndi

    from napari_cytodiffusion.core.model.classifier import _low_band

    error = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    low = _low_band(torch.from_numpy(error), 2.0).numpy()
    expected = ndi.gaussian_filter(error, (0, 0, 2.0, 2.0), mode="mirror", truncate=3.0)
    assert low.shape == error.shape
    np.testing.assert_allclose(low, expected, atol=1e-5)


def test_only_soft_cells_are_scored_apart_and_only_with_a_calibration_for_them(default_model):
    from napari_cytodiffusion.core.model.classifier import _scoring_groups, error_band

    softness = np.array([0.2, 1.8, np.nan, 1.2])
    plain = _copy_with(default_model, {"soft": None})
    [(scorer, cells)] = _scoring_groups(plain, softness)
    assert scorer is plain and cells.tolist() == [0, 1, 2, 3]
    with_soft = _copy_with(default_model, {"soft": {"error_band": 2.0, "class_bias": [0.0] * 8}})
    (sharp_scorer, sharp), (soft_scorer, soft) = _scoring_groups(with_soft, softness)
    assert sharp_scorer is with_soft and sharp.tolist() == [0, 2]
    assert soft.tolist() == [1, 3] and error_band(soft_scorer) == 2.0
    assert soft_scorer.calibration["class_bias"] == [0.0] * 8
    assert soft_scorer.calibration["domain"] is default_model.calibration["domain"]
    assert "soft" not in soft_scorer.calibration and error_band(sharp_scorer) == 0.0


def _copy_with(model, calibration):
    import copy

    view = copy.copy(model)
    view.calibration = {**model.calibration, **calibration}
    return view


def test_the_shipped_model_calls_defocused_cells_on_the_low_band(default_model, pbc_crops):
    # Blurred by 1.5 model pixels a lymphocyte is called a platelet on the whole band; on the
    # low band, with the calibration fitted for soft cells, every example keeps its class.
    from scipy import ndimage as ndi

    crops, labels = pbc_crops
    blurred = ndi.gaussian_filter(crops, (0, 1.5, 1.5, 0))
    whole_band = _copy_with(default_model, {"soft": None})
    assert [c.label for c in classify_crops(whole_band, blurred)][1] == "platelet"
    calls = classify_crops(default_model, blurred)
    assert [c.label for c in calls] == labels
    assert all(c.softness > 1 and c.needs_review for c in calls)  # still unlike the training
