"""The blinded Turing test: panel building, exporting and the scoring maths."""

import csv
import re

import numpy as np
import pytest
from scipy.stats import beta

from napari_cytodiffusion import cli
from napari_cytodiffusion.core import turing


def _crops(n, value):
    crops = np.full((n, 64, 64, 3), 0.9, np.float32)
    crops[:, 20:44, 20:44] = value  # a "cell" on background
    return crops


def _panel(seed=0):
    real, synthetic = _crops(3, 0.2), _crops(3, 0.4)
    labels = ["lymphocyte", "monocyte", "lymphocyte"]
    origins = {"real": ["a.jpg", "b.jpg", "c.jpg"], "synthetic": ["seed 0", "seed 1", "seed 2"]}
    return turing.build_panel(real, labels, synthetic, labels, seed, origins)


def test_panel_is_shuffled_by_its_seed_and_keeps_the_key():
    panel = _panel(seed=4)
    assert len(panel) == 6 and panel.images.shape == (6, 64, 64, 3)
    assert [row["item"] for row in panel.key] == [1, 2, 3, 4, 5, 6]
    assert sorted(row["truth"] for row in panel.key) == ["real"] * 3 + ["synthetic"] * 3
    assert [row["truth"] for row in panel.key] == [row["truth"] for row in _panel(seed=4).key]
    orders = {tuple(row["origin"] for row in _panel(seed=s).key) for s in range(6)}
    assert len(orders) > 1
    for image, row in zip(panel.images, panel.key, strict=True):
        # Each image is the cell its key row names: the real ones are darker here.
        assert (image[32, 32].mean() < 0.3) == (row["truth"] == "real")
        assert (row["origin"].endswith(".jpg")) == (row["truth"] == "real")


def test_real_and_synthetic_get_the_same_background_and_quantisation():
    panel = _panel()
    backgrounds = panel.images[:, 2, 2]
    np.testing.assert_allclose(backgrounds, backgrounds[0][None].repeat(6, 0))
    np.testing.assert_allclose(panel.images * 255, np.round(panel.images * 255), atol=1e-3)


def test_panel_sizes_must_match():
    with pytest.raises(ValueError, match="differ in size"):
        turing.build_panel(_crops(1, 0.2), ["lymphocyte"], np.zeros((1, 32, 32, 3)), ["lymphocyte"])


def _key(truths, labels):
    return [
        {"item": i, "truth": t, "label": lab}
        for i, (t, lab) in enumerate(zip(truths, labels, strict=True), 1)
    ]


def test_score_maths_on_known_answers():
    truths = ["real", "synthetic"] * 5
    labels = ["lymphocyte"] * 6 + ["monocyte"] * 4
    key = _key(truths, labels)
    # Right on the first 8 items, wrong on the last 2.
    answers = {row["item"]: row["truth"] if row["item"] <= 8 else "real" for row in key}
    answers[10] = "real"  # truth synthetic: wrong
    answers[9] = "synthetic"  # truth real: wrong
    result = turing.score(answers, key)
    overall = result["overall"]
    assert (overall["n"], overall["correct"], overall["accuracy"]) == (10, 8, 0.8)
    # Clopper-Pearson from the beta distribution, and P(X >= 8) for X ~ Bin(10, 1/2) = 56 / 1024.
    assert overall["ci_low"] == pytest.approx(beta.ppf(0.025, 8, 3))
    assert overall["ci_high"] == pytest.approx(beta.ppf(0.975, 9, 2))
    assert overall["p_value"] == pytest.approx(56 / 1024)
    assert result["better_than_chance"] is False
    assert result["by_class"]["lymphocyte"]["accuracy"] == 1.0
    assert result["by_class"]["monocyte"]["correct"] == 2
    assert (
        result["by_truth"]["real"]["correct"] == 4
        and result["by_truth"]["synthetic"]["correct"] == 4
    )
    assert result["unanswered"] == 0


def test_a_perfect_expert_beats_chance_and_blanks_are_not_scored():
    key = _key(["real", "synthetic"] * 10, ["neutrophil"] * 20)
    rows = [{"item": str(r["item"]), "answer": "R" if r["truth"] == "real" else "s"} for r in key]
    rows[0]["answer"] = ""
    result = turing.score(rows, key)
    assert result["overall"]["n"] == 19 and result["unanswered"] == 1
    assert result["overall"]["p_value"] == pytest.approx(0.5**19)
    assert result["better_than_chance"] is True
    assert "better than chance" in turing.score_text(result)


def test_a_spreadsheets_trailing_empty_row_is_not_an_answer(tmp_path):
    from napari_cytodiffusion.core.tasks.turing import score_turing_test

    key = _key(["real", "synthetic"], ["neutrophil"] * 2)
    key_file = tmp_path / "key.csv"
    turing.write_csv(key_file, key, turing.KEY_COLUMNS)
    answers = tmp_path / "answers.csv"
    answers.write_text("item;file;answer;seconds\n1;a.png;real;2\n2;b.png;S;3\n;;;\n;;;\n")
    result = score_turing_test(answers, key_file)
    assert result["overall"]["n"] == 2 and result["overall"]["correct"] == 2


def test_bad_answers_are_explained():
    key = _key(["real"], ["neutrophil"])
    with pytest.raises(ValueError, match="neither real"):
        turing.score({1: "maybe"}, key)
    with pytest.raises(ValueError, match="not in the key"):
        turing.score({1: "real", 7: "fake"}, key)


def test_export_keeps_the_key_out_of_the_panel_folder(tmp_path):
    panel = _panel()
    folder, key_path = turing.export_panel(panel, tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["answers.csv"] + [
        f"item_00{i}.png" for i in range(1, 7)
    ]
    template = list(csv.DictReader(open(folder / "answers.csv")))
    assert [r["answer"] for r in template] == [""] * 6
    assert "truth" not in template[0]
    assert key_path.parent == tmp_path
    assert [r["truth"] for r in csv.DictReader(open(key_path))] == [r["truth"] for r in panel.key]


def test_make_panel_generates_one_synthetic_cell_per_real_cell(default_model):
    panel = turing.make_panel(
        default_model, _crops(2, 0.2), ["platelet", "basophil"], seed=1, steps=1
    )
    synthetic = [row for row in panel.key if row["truth"] == "synthetic"]
    assert sorted(row["label"] for row in synthetic) == ["basophil", "platelet"]
    assert {row["origin"] for row in synthetic} == {"seed 1", "seed 2"}


def test_turing_commands(pbc_dir, tmp_path, capsys):
    out = tmp_path / "test"
    make = ["turing", "make", "--real", str(pbc_dir / "splits.csv"), "--split", "test", "--n", "2"]
    assert (
        cli.main(
            [*make, "--steps", "1", "--rbc-diameter", "29", "--device", "cpu", "--out", str(out)]
        )
        == 0
    )
    key = list(csv.DictReader(open(out / "key.csv")))
    assert len(key) == 4 and len(list((out / "panel").glob("*.png"))) == 4
    answers = out / "answers.csv"
    with open(answers, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["item", "answer"])
        writer.writeheader()
        writer.writerows({"item": r["item"], "answer": r["truth"]} for r in key)
    capsys.readouterr()
    score_csv = tmp_path / "score.csv"
    assert (
        cli.main(["turing", "score", str(answers), str(out / "key.csv"), "--out", str(score_csv)])
        == 0
    )
    assert "accuracy 1.000 (4/4)" in capsys.readouterr().out
    rows = list(csv.DictReader(open(score_csv)))
    assert rows[0]["group"] == "overall" and rows[0]["p_value"] == str(0.5**4)


def test_turing_score_rejects_missing_files(tmp_path, capsys):
    assert (
        cli.main(["turing", "score", str(tmp_path / "a.csv"), str(tmp_path / "k.csv")])
        == cli.USAGE_ERROR
    )
    assert "No such file" in capsys.readouterr().err


def test_turing_score_replaces_no_input_and_no_file_unasked(tmp_path, capsys):
    key = _key(["real", "synthetic"], ["neutrophil"] * 2)
    key_file, answers = tmp_path / "key.csv", tmp_path / "answers.csv"
    turing.write_csv(key_file, key, turing.KEY_COLUMNS)
    answers.write_text("item,answer\n1,real\n2,synthetic\n")
    kept = tmp_path / "score.csv"
    kept.write_text("a person's notes\n")
    inputs = {path: path.read_text() for path in (key_file, answers, kept)}
    score = ["turing", "score", str(answers), str(key_file), "--out"]
    for out, flags, message in (
        (key_file, ["--overwrite"], "is the file .*key.csv given to score"),
        (answers, ["--overwrite"], "is the file .*answers.csv given to score"),
        (kept, [], "score.csv exists; choose another --out file, or replace it"),
    ):
        assert cli.main([*score, str(out), *flags]) == cli.USAGE_ERROR
        assert re.search(message, capsys.readouterr().err)
    assert {path: path.read_text() for path in inputs} == inputs
    assert cli.main([*score, str(kept), "--overwrite"]) == 0
    assert next(csv.DictReader(open(kept)))["group"] == "overall"


def test_the_real_cells_of_one_scanner_are_cut_at_one_scale(pbc_dir):
    from napari_cytodiffusion.core.tasks.turing import TuringRequest, _real_cell_scales

    request = TuringRequest(n=6, folder=pbc_dir / "splits.csv", split="test", seed=3)
    records = turing.select_real_cells(request.folder, request.n, request.seed, request.split)
    scales = _real_cell_scales(request, records)
    # Each image measured alone varies by 10-20 % (PBC test: 0.97-1.19 of 29 px, 10th-90th
    # percentile), which synthetic cells do not: one scale per scanner, as in training.
    assert len(set(scales)) == 1 and 26 < scales[0] < 32
    given = TuringRequest(n=6, folder=request.folder, rbc_diameter=30.0)
    assert _real_cell_scales(given, records) == 30.0


def test_export_refuses_a_folder_holding_a_panel(tmp_path):
    folder, key_path = turing.export_panel(_panel(), tmp_path)
    (folder / "answers.csv").write_text("item,file,answer,seconds\n1,item_001.png,real,2.5\n")
    answers, key = (folder / "answers.csv").read_text(), key_path.read_text()
    smaller = turing.build_panel(_crops(1, 0.2), ["monocyte"], _crops(1, 0.4), ["monocyte"])
    with pytest.raises(ValueError, match="choose an empty folder or remove the old panel"):
        turing.export_panel(smaller, tmp_path)
    # The expert's answers can still be scored against their key; no item was replaced.
    assert (folder / "answers.csv").read_text() == answers and key_path.read_text() == key
    assert len(list(folder.glob("item_*.png"))) == 6


def test_turing_make_refuses_a_folder_holding_a_panel_before_generating(
    pbc_dir, tmp_path, capsys, monkeypatch
):
    turing.export_panel(_panel(), tmp_path)
    key = (tmp_path / "key.csv").read_text()
    monkeypatch.setattr(cli, "_load_model", lambda *_: pytest.fail("generated a new panel"))
    make = ["turing", "make", "--real", str(pbc_dir / "splits.csv"), "--n", "1"]
    assert cli.main([*make, "--out", str(tmp_path)]) == cli.USAGE_ERROR
    assert "remove the old panel" in capsys.readouterr().err
    assert (tmp_path / "key.csv").read_text() == key


def test_a_request_that_cannot_make_a_panel_is_refused_with_what_to_give(default_model):
    from napari_cytodiffusion.core.tasks.turing import TuringRequest, make_turing_panel

    stack = np.full((2, 64, 64, 3), 0.8, np.float32)
    bad = {
        "Give the real cells": TuringRequest(n=1),
        "one class per image in labels: 2 images, no labels": TuringRequest(n=1, images=stack),
        "2 images, 1 labels": TuringRequest(n=1, images=stack, labels=["platelet"]),
        "guidance must be a finite number": TuringRequest(
            n=1, images=stack, labels=["platelet"] * 2, guidance=-1.0
        ),
        "guidance must be a finite number of at least 1": TuringRequest(
            n=1, images=stack, labels=["platelet"] * 2, guidance=0.5
        ),
        "seed must be from 0 to 9223372036854775806 for 2 cells": TuringRequest(
            n=2, images=stack, labels=["platelet"] * 2, seed=2**63 - 1
        ),
        "steps must be a whole number": TuringRequest(
            n=1, images=stack, labels=["platelet"] * 2, steps=2.5
        ),
        "a whole number of real cells": TuringRequest(
            n=True, images=stack, labels=["platelet"] * 2
        ),
    }
    for message, request in bad.items():
        with pytest.raises(ValueError, match=message):
            make_turing_panel(default_model, request)


def test_a_real_image_without_a_cell_is_named(tmp_path):
    from napari_cytodiffusion.core.smear.image import ImageError
    from napari_cytodiffusion.core.turing import normalise_real_cells

    empty = np.full((120, 120, 3), 232, np.uint8)
    empty += np.random.default_rng(1).integers(0, 6, empty.shape, dtype=np.uint8)
    crop = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)  # a model crop
    with pytest.raises(ImageError, match=r"^image 1 \(counted from 0\): No cell found"):
        normalise_real_cells([crop, empty], 64, 30.0)


def test_a_given_guidance_is_used_not_replaced_by_the_default(default_model):
    from napari_cytodiffusion.core.tasks.turing import TuringRequest, make_turing_panel

    stack = np.full((1, 64, 64, 3), 0.9, np.float32)
    stack[:, 16:48, 16:48] = [0.4, 0.2, 0.6]  # a cell-like blot on the glass

    def synthetic(guidance):
        request = TuringRequest(
            n=1, images=stack, labels=["platelet"], steps=2, guidance=guidance, rbc_diameter=29
        )
        panel = make_turing_panel(default_model, request)
        rows = zip(panel.images, panel.key, strict=True)
        return next(image for image, row in rows if row["truth"] == "synthetic")

    # 2 is the default: not given, it is used; given, 1 is used instead.
    assert not np.array_equal(synthetic(1.0), synthetic(2.0))
    np.testing.assert_array_equal(synthetic(None), synthetic(2.0))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (None, "has no split column"),
        ("file,label\nlymphocyte/a.jpg,lymphocyte\n", "has no split column"),
        ("file,label,split\nlymphocyte/a.jpg,lymphocyte,train\n", "None of the cells of"),
    ],
)
def test_a_split_without_cells_says_why(tmp_path, table, message):
    import shutil

    from napari_cytodiffusion._sample_data import sample_path

    (tmp_path / "lymphocyte").mkdir()
    shutil.copy(sample_path("pbc_lymphocyte"), tmp_path / "lymphocyte" / "a.jpg")
    data = tmp_path
    if table is not None:
        data = tmp_path / "cells.csv"
        data.write_text(table)
    with pytest.raises(ValueError, match=f"{message}.* split 'test'"):
        turing.select_real_cells(data, 1, split="test")
    assert len(turing.select_real_cells(data, 1)) == 1
