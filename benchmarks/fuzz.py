"""Hostile and unlucky command lines: no traceback, no silent wrong result, no good input refused.

    python benchmarks/fuzz.py            # every case (600+), results in benchmarks/results/

Each case is a command line (built against a folder of generated files: broken, empty,
grayscale, CMYK, NaN, huge-valued, BOM and ``;`` CSVs, and good ones) with the outcome a user
should get: ``ok`` (exit code 0) or ``error`` (exit code 2 with a one-line message and no
traceback). A case fails if it ends otherwise: a traceback or exit code 1 (a bug), exit 0 on
bad input (a silent wrong result), or exit 2 on good input (a false reject). The cases run in
this process through ``cli.main``; ``tests/test_fuzz.py`` runs a quick sample of them in CI.
"""

import argparse
import contextlib
import io
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS  # noqa: E402

from napari_cytodiffusion.core.model.weights import CACHE_ENV  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "napari_cytodiffusion" / "sample_data"
BAD_NUMBERS = ("-5", "0.5", "1e-300", "inf", "-inf", "nan", "1e6", "abc", "")
BAD_COUNTS = ("0", "-1", "abc", "1e3", "")


def make_files(folder):
    """Good and bad input files in ``folder``; returns {name: path}."""
    import tifffile
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    field = np.asarray(Image.open(SAMPLES / "cbc_lymphocyte.jpg").convert("RGB"))
    cell = np.asarray(Image.open(SAMPLES / "pbc_lymphocyte.jpg").convert("RGB"))
    files = {"field": SAMPLES / "cbc_lymphocyte.jpg", "cell": SAMPLES / "pbc_lymphocyte.jpg"}

    def image(name, array, **options):
        path = folder / name
        if path.suffix == ".tif":
            tifffile.imwrite(path, array, **options)
        else:
            Image.fromarray(array).save(path)
        files[Path(name).stem] = path

    image("gray.png", field[..., 0])
    image("cbc_lymphocyte.png", field)  # the field's name, another file
    image("rgba.png", np.dstack([field, np.full(field.shape[:2], 255, np.uint8)]))
    image("blank.png", np.full((200, 300, 3), 210, np.uint8))
    image("tiny.png", field[:5, :5])
    image("field16.tif", field.astype(np.uint16) * 257)
    image("field_float.tif", field.astype(np.float32) / 255)
    image("field_lzw.tif", field, compression="lzw")
    image("field_jpeg.tif", field, compression="jpeg")
    image("field_planar.tif", np.moveaxis(field, -1, 0), planarconfig="separate")
    hot = field.astype(np.float32)
    hot[3, 3, 0] = 1e38
    image("field_hot.tif", hot)
    nan = field.astype(np.float32)
    nan[10:20, 10:20] = np.nan
    image("field_nan.tif", nan)
    image("stack.tif", np.stack([field, field]))
    image("cell_big.png", np.kron(cell, np.ones((2, 2, 1), np.uint8)))
    Image.fromarray(field).convert("CMYK").save(folder / "cmyk.tif")
    files["cmyk"] = folder / "cmyk.tif"
    for name, content in (
        ("empty.png", b""),
        ("text.png", b"not an image at all"),
        ("truncated.png", (SAMPLES / "cbc_lymphocyte.jpg").read_bytes()[:3000]),
        ("binary.csv", bytes(range(256)) * 4),
    ):
        (folder / name).write_bytes(content)
        files[Path(name).stem] = folder / name
    files["missing"] = folder / "missing.png"
    files["folder"] = folder
    files["under_file"] = files["text"] / "out"
    return files


def turing_files(folder):
    """Answer and key CSVs written the ways people write them, good and bad."""
    folder = Path(folder)
    truths = ["real", "synthetic"] * 5
    key = "item,file,truth,label,origin\n" + "".join(
        f"{i},item_{i:03d}.png,{t},lymphocyte,x\n" for i, t in enumerate(truths, 1)
    )
    answers = "item,answer\n" + "".join(f"{i},{t}\n" for i, t in enumerate(truths, 1))
    variants = {
        "key": key,
        "answers": answers,
        "answers_bom": "\ufeff" + answers,
        "answers_semicolon": answers.replace(",", ";"),
        "key_capitals": key.replace(",real,", ",Real,").replace(",synthetic,", ",Synthetic,"),
        "key_letters": key.replace(",real,", ",R,").replace(",synthetic,", ",S,"),
        "key_duplicate": key + "1,item_001.png,real,lymphocyte,x\n",
        "key_garbage": key.replace(",real,", ",maybe,"),
        "answers_conflict": answers + "1,synthetic\n",
        "answers_missing_column": answers.replace("answer", "guess"),
        "answers_bad_item": answers + "abc,real\n",
        "answers_huge_field": answers + f"11,{'x' * 200_000}\n",
        "empty": "",
    }
    paths = {}
    for name, text in variants.items():
        path = folder / f"{name}.csv"
        path.write_text(text, encoding="utf-8")
        paths[name] = path
    return paths


def lab_files(folder):
    """Labelled cell folders and CSVs for adapt and calibrate, good and bad; {name: path}.

    Each class's cells are one sample image turned and mirrored (8 a class: enough held back
    for the lab's domain reference), so no two classes share a cell."""
    from PIL import Image

    folder = Path(folder)
    sources = {"lymphocyte": "pbc_lymphocyte.jpg", "monocyte": "cbc_monocyte_eosinophil.jpg"}
    rows = []
    for label, name in sources.items():
        cell = Image.open(SAMPLES / name).convert("RGB")
        (folder / "lab" / label).mkdir(parents=True, exist_ok=True)
        for view in range(8):
            path = folder / "lab" / label / f"{label}_{view}.png"
            turned = cell.rotate(90 * (view % 4), expand=True)
            (turned.transpose(Image.FLIP_LEFT_RIGHT) if view >= 4 else turned).save(path)
            rows.append(f"{path},{label}")
    broken = folder / "lab_broken"
    if not broken.exists():
        import shutil

        shutil.copytree(folder / "lab", broken)
    (broken / "monocyte" / "broken.png").write_bytes(b"not an image")
    csv = "file,label\n" + "\n".join(rows) + "\n"
    texts = {
        "lab_bom_semicolon.csv": "\ufeff" + csv.replace(",", ";"),
        "lab_no_columns.csv": "name,class\na,b\n",
        "lab_header_only.csv": "file,label\n",
        "lab_missing_file.csv": csv + f"{folder / 'nowhere.png'},monocyte\n",
    }
    for name, text in texts.items():
        (folder / name).write_text(text, encoding="utf-8")
    paths = {name: folder / name for name in texts}
    return {"lab": folder / "lab", "lab_broken": broken, **paths}


def lab_cases(files, labs):
    """(name, argv, expected) for adapt, calibrate and export-cells."""
    found = []

    def add(name, argv, expected):
        found.append((name, [str(a) for a in argv], expected))

    adapt = ["adapt", labs["lab"], "--steps", "1", "--device", "cpu"]
    add("adapt ok", [*adapt, "--out", "fuzz-lab"], "ok")
    add("calibrate the adapted model", ["calibrate", "fuzz-lab", labs["lab"]], "ok")
    add(
        "adapt csv with BOM and ;",
        ["adapt", labs["lab_bom_semicolon.csv"], "--steps", "1", "--out", "fuzz-csv"],
        "ok",
    )
    for data in ("lab_broken", "lab_no_columns.csv", "lab_header_only.csv", "lab_missing_file.csv"):
        add(f"adapt {data}", ["adapt", labs[data], "--steps", "1", "--out", "fuzz-x"], "error")
    for data in ("missing", "text", "folder", "binary"):
        add(
            f"adapt data {data}", ["adapt", files[data], "--steps", "1", "--out", "fuzz-x"], "error"
        )
    for name in ("", "../escape", "default", "a/b", "x" * 300):
        add(f"adapt out {name[:20]!r}", [*adapt, "--out", name], "error")
    for value in ("-1", "abc", ""):
        add(
            f"adapt steps {value!r}",
            ["adapt", labs["lab"], "--out", "fuzz-x", "--steps", value],
            "error",
        )
    for value in BAD_NUMBERS:
        add(f"adapt rbc {value!r}", [*adapt, "--out", "fuzz-x", "--rbc-diameter", value], "error")
    for device in ("tpu", "cuda:x", ""):
        add(f"adapt device {device!r}", [*adapt, "--out", "fuzz-x", "--device", device], "error")
    add("adapt base missing", [*adapt, "--out", "fuzz-x", "--base", "no-such-model"], "error")
    add("calibrate model missing", ["calibrate", "no-such-model", labs["lab"]], "error")
    add("calibrate data missing", ["calibrate", "default", files["missing"]], "error")
    for image in ("field", "missing", "text"):
        argv = ["export-cells", files[image], "--out", labs["lab"].parent / "export"]
        add(f"export-cells {image} (nothing annotated)", argv, "error")
    for command in ("adapt", "calibrate", "export-cells"):
        add(f"{command} no arguments", [command], "error")
    return found


def cases(files, csvs, out):
    """(name, argv, expected) for every case; ``out`` is a scratch folder."""
    good_images, bad_images = GOOD_IMAGES, BAD_IMAGES
    found = []

    def add(name, argv, expected):
        found.append((name, [str(a) for a in argv], expected))

    for image in good_images:
        add(f"segment {image}", ["segment", files[image], "--json"], "ok")
    for image in bad_images:
        add(f"segment {image}", ["segment", files[image]], "error")
        add(f"segment {image} + good", ["segment", files[image], files["field"]], "error")
    for value in BAD_NUMBERS:
        add(f"segment rbc {value!r}", ["segment", files["field"], "--rbc-diameter", value], "error")
    for place in ("text", "under_file"):
        add(f"segment out {place}", ["segment", files["field"], "--out", files[place]], "error")
    add(
        "segment out same stem",
        ["segment", files["field"], files["cbc_lymphocyte"], "--out", out / "s"],
        "error",
    )
    add(
        "segment out same file twice",
        ["segment", files["field"], files["field"], "--out", out / "twice"],
        "ok",
    )
    add("segment out ok", ["segment", files["field"], "--out", out / "seg"], "ok")
    for image in ("cell", "cell_big", "field_hot", "cmyk", "field_planar"):
        add(f"classify {image}", ["classify", files[image], "--device", "cpu"], "ok")
    add("classify smear", ["classify", files["field"], "--segment", "--device", "cpu"], "ok")
    for image in bad_images:
        add(f"classify {image}", ["classify", files[image], "--device", "cpu"], "error")
    for value in BAD_NUMBERS:
        argv = ["classify", files["cell"], "--rbc-diameter", value, "--device", "cpu"]
        add(f"classify rbc {value!r}", argv, "error")
    for model in ("missing", "text", "empty", "field"):
        add(
            f"classify model {model}", ["classify", files["cell"], "--model", files[model]], "error"
        )
    for option, value in (("--strategy", "fast"), ("--device", "tpu"), ("--seed", "abc")):
        add(f"classify {option} {value}", ["classify", files["cell"], option, value], "error")
    for value in ("-1", str(2**70)):
        add(f"classify seed {value}", ["classify", files["cell"], "--seed", value], "error")
    generate = ["generate", "--label", "platelet", "--steps", "1", "--device", "cpu"]
    add("generate ok", [*generate, "-n", "2", "--out", out / "gen"], "ok")
    add(
        "generate alias",
        ["generate", "--label", "IG", "-n", "1", "--steps", "1", "--out", out / "g2"],
        "ok",
    )
    for label in ("blast", "", "platelets!"):
        add(
            f"generate label {label!r}",
            ["generate", "--label", label, "--out", out / "g3"],
            "error",
        )
    for value in (*BAD_COUNTS, "100000", str(10**12)):
        add(f"generate n {value!r}", [*generate, "-n", value, "--out", out / "g4"], "error")
    for value in BAD_COUNTS:
        argv = ["generate", "--label", "platelet", "--steps", value, "--out", out / "g5"]
        add(f"generate steps {value!r}", argv, "error")
    for value in ("nan", "inf", "-1", "abc"):
        argv = [*generate, "-n", "1", "--guidance", value, "--out", out / "g6"]
        add(f"generate guidance {value!r}", argv, "error")
    for place in ("text", "under_file"):
        add(f"generate out {place}", [*generate, "-n", "1", "--out", files[place]], "error")
    explain = ["counterfactual", files["cell"], "--target", "monocyte", "--device", "cpu"]
    quick = ["--trials", "1", "--steps", "2"]
    add("counterfactual ok", [*explain, *quick, "--out", out / "cf"], "ok")
    add(
        "counterfactual crop",
        ["counterfactual", files["cell"], "--target", "ig", *quick, "--out", out / "cf2"],
        "ok",
    )
    for option, values in (
        ("--trials", BAD_COUNTS),
        ("--steps", BAD_COUNTS),
        ("--strength", ("0", "-0.5", "1.5", "nan", "abc")),
        ("--guidance", ("nan", "inf", "-2")),
        ("--rbc-diameter", BAD_NUMBERS),
        ("--method", ("blend",)),
        ("--source", ("blast",)),
    ):
        for value in values:
            argv = [*explain, *quick, option, value, "--out", out / "cf3"]
            add(f"counterfactual {option} {value!r}", argv, "error")
    for target in ("blast", ""):
        add(
            f"counterfactual target {target!r}",
            ["counterfactual", files["cell"], "--target", target, "--out", out / "cf4"],
            "error",
        )
    for cell_id in ("0", "-1", "999"):
        argv = ["counterfactual", files["field"], "--target", "monocyte", "--segment"]
        add(
            f"counterfactual cell {cell_id}",
            [*argv, "--cell-id", cell_id, "--out", out / "cf5"],
            "error",
        )
    for image in bad_images:
        add(
            f"counterfactual {image}",
            ["counterfactual", files[image], "--target", "monocyte", "--out", out / "cf6"],
            "error",
        )
    for place in ("text", "under_file"):
        add(f"counterfactual out {place}", [*explain, *quick, "--out", files[place]], "error")
    for answers, key, expected in (
        ("answers", "key", "ok"),
        ("answers_bom", "key", "ok"),
        ("answers_semicolon", "key", "ok"),
        ("answers", "key_capitals", "ok"),
        ("answers", "key_letters", "ok"),
        ("answers", "key_duplicate", "error"),
        ("answers", "key_garbage", "error"),
        ("answers_conflict", "key", "error"),
        ("answers_missing_column", "key", "error"),
        ("answers_bad_item", "key", "error"),
        ("answers_huge_field", "key", "error"),
        ("empty", "key", "error"),
        ("answers", "empty", "error"),
    ):
        add(
            f"turing score {answers} {key}", ["turing", "score", csvs[answers], csvs[key]], expected
        )
    add("turing score binary", ["turing", "score", files["binary"], csvs["key"]], "error")
    add("turing score missing", ["turing", "score", files["missing"], csvs["key"]], "error")
    train = ["train", files["folder"], "--out", out / "t.ckpt", "--device", "cpu"]
    for option, values in (
        ("--steps", ("-1", "abc")),
        ("--channels", ("0,0,0", "a,b", "", "16")),
        ("--resolution", ("0", "7", "-64")),
        ("--batch-size", ("0", "-3")),
        ("--lr", ("0", "-1", "nan", "5")),
    ):
        for value in values:
            add(f"train {option} {value!r}", [*train, option, value], "error")
    for resume in ("missing", "text", "empty"):
        add(f"train resume {resume}", [*train, "--resume", files[resume]], "error")
    add("train data missing", ["train", files["missing"], "--out", out / "t.ckpt"], "error")
    add(
        "train out missing folder",
        ["train", files["folder"], "--out", out / "no" / "t.ckpt"],
        "error",
    )
    add("train data empty folder", ["train", out, "--out", out / "t2.ckpt"], "error")
    add("models hash a text file", ["models", "hash", files["text"]], "ok")
    for image in ("missing", "folder"):
        add(f"models hash {image}", ["models", "hash", files[image]], "error")
    add("models path unknown", ["models", "path", "no-such-model"], "error")
    add("models list", ["models", "list"], "ok")
    add("analyze missing", ["analyze", files["missing"], "--out", out / "a"], "error")
    add(
        "analyze workers 0",
        ["analyze", files["field"], "--out", out / "a", "--workers", "0"],
        "error",
    )
    for command in ("segment", "classify", "generate", "counterfactual", "turing", "train"):
        add(f"{command} no arguments", [command], "error")
        add(f"{command} unknown option", [command, "--frobnicate"], "error")
    return found


GOOD_IMAGES = ("field", "rgba", "field16", "field_float", "field_lzw", "field_jpeg")
GOOD_IMAGES += ("field_planar", "field_hot", "cmyk")
BAD_IMAGES = ("gray", "blank", "tiny", "empty", "text", "truncated", "missing", "folder")
BAD_IMAGES += ("stack", "field_nan", "binary")


def combinations(files, out):
    """More calls: bad values with every image, bad images with good ones, option pairs."""
    found = []

    def add(name, argv, expected):
        found.append((name, [str(a) for a in argv], expected))

    for image, value in itertools.product(GOOD_IMAGES + BAD_IMAGES, BAD_NUMBERS):
        add(
            f"segment {image} rbc {value!r}",
            ["segment", files[image], "--rbc-diameter", value],
            "error",
        )
    for image, value in itertools.product(GOOD_IMAGES, (3.5, 9, 30, 120, 500)):
        add(
            f"segment {image} rbc {value}", ["segment", files[image], "--rbc-diameter", value], "ok"
        )
    for image in GOOD_IMAGES:
        add(f"segment {image} out", ["segment", files[image], "--json", "--out", out / image], "ok")
    for bad, good in itertools.product(BAD_IMAGES, GOOD_IMAGES):
        add(f"segment {bad} then {good}", ["segment", files[bad], files[good], "--json"], "error")
    for image, strategy in itertools.product(BAD_IMAGES, ("adaptive", "exhaustive")):
        argv = ["classify", files[image], "--strategy", strategy, "--device", "cpu"]
        add(f"classify {image} {strategy}", argv, "error")
    for image, value in itertools.product(("cell", "field_hot"), BAD_NUMBERS):
        argv = ["classify", files[image], "--rbc-diameter", value, "--device", "cpu"]
        add(f"classify {image} rbc {value!r}", argv, "error")
    for label, count in itertools.product(("blast", "", "neutrophils"), (*BAD_COUNTS, "3")):
        argv = ["generate", "--label", label, "-n", count, "--out", out / "gx"]
        add(f"generate {label!r} n {count!r}", argv, "error")
    for guidance, steps in itertools.product(("nan", "inf", "-1", "abc"), BAD_COUNTS):
        argv = ["generate", "--label", "platelet", "--guidance", guidance, "--steps", steps]
        add(
            f"generate guidance {guidance!r} steps {steps!r}", [*argv, "--out", out / "gy"], "error"
        )
    for image, target in itertools.product(BAD_IMAGES, ("monocyte", "ig")):
        argv = ["counterfactual", files[image], "--target", target, "--out", out / "cz"]
        add(f"counterfactual {image} {target}", argv, "error")
    for channels, resolution in itertools.product(("0,0,0", "a,b", "", "16"), ("0", "7", "-64")):
        argv = ["train", files["folder"], "--out", out / "t.ckpt", "--channels", channels]
        add(
            f"train channels {channels!r} resolution {resolution!r}",
            [*argv, "--resolution", resolution],
            "error",
        )
    return found


def run_case(argv):
    """(exit code, stderr) of ``cli.main(argv)`` in this process."""
    from napari_cytodiffusion.cli import main

    error, output = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(error), contextlib.redirect_stdout(output):
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse's usage errors
            code = stop.code
        except Exception:  # a bug: shown as the traceback a user would see
            import traceback

            traceback.print_exc(file=error)
            code = 1
    return code, error.getvalue()


def verdict(expected, code, stderr):
    if "Traceback" in stderr or code not in (0, 2):
        return "traceback"
    if expected == "error" and code == 0:
        return "silent wrong result"
    if expected == "ok" and code != 0:
        return "false reject"
    return "as expected"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default="/tmp/cytodiffusion_fuzz")
    args = parser.parse_args()
    folder = Path(args.folder)
    files = make_files(folder / "files")
    csvs = turing_files(folder / "files")
    all_cases = cases(files, csvs, folder / "out") + combinations(files, folder / "out")
    # Adapted models go to a scratch cache, never the user's.
    os.environ[CACHE_ENV] = str(folder / "cache")
    all_cases += lab_cases(files, lab_files(folder / "labs"))
    counts, failures = {}, []
    started = time.perf_counter()
    for name, argv, expected in all_cases:
        code, stderr = run_case(argv)
        outcome = verdict(expected, code, stderr)
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome != "as expected":
            failures.append({"case": name, "argv": argv, "code": code, "stderr": stderr[-600:]})
            print(outcome, name, code, stderr.strip().splitlines()[-1:] if stderr else "")
    result = {
        "cases": len(all_cases),
        "counts": counts,
        "failures": failures,
        "seconds": round(time.perf_counter() - started),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    (RESULTS / "fuzz.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}, indent=1))


if __name__ == "__main__":
    main()
