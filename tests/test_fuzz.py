"""A quick sample of the hostile and unlucky command lines of ``benchmarks/fuzz.py``: each ends
in exit code 0 or 2 as a user should get it, never in a traceback; the full set (600+) runs in
the benchmark."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fuzz  # noqa: E402

# Commands whose cases are quick (no model is run); a few of each of the others.
QUICK = ("segment", "turing", "train", "models", "analyze")
PER_SLOW_COMMAND = 4


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    files = fuzz.make_files(folder / "files")
    return files, fuzz.turing_files(folder / "files"), folder / "out"


def test_there_are_more_than_600_cases(made):
    files, csvs, out = made
    everything = fuzz.cases(files, csvs, out) + fuzz.combinations(files, out)
    assert len(everything) >= 600
    assert {expected for _, _, expected in everything} == {"ok", "error"}


def test_a_sample_of_cases_ends_as_a_user_should_get_it(made):
    slow_taken = {}
    failures = []
    for name, argv, expected in fuzz.cases(*made):
        command = argv[0]
        if command not in QUICK:
            if expected == "ok" or slow_taken.get(command, 0) >= PER_SLOW_COMMAND:
                continue
            slow_taken[command] = slow_taken.get(command, 0) + 1
        code, stderr = fuzz.run_case(argv)
        outcome = fuzz.verdict(expected, code, stderr)
        if outcome != "as expected":
            failures.append(f"{outcome}: {name} -> exit {code}: {stderr.strip()[-300:]}")
    assert not failures, "\n".join(failures)


def test_adapt_calibrate_and_export_refuse_bad_input_with_a_message(made, tmp_path, monkeypatch):
    from napari_cytodiffusion.core.model.weights import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    files = made[0]
    lab_cases = fuzz.lab_cases(files, fuzz.lab_files(tmp_path / "labs"))
    assert {argv[0] for _, argv, _ in lab_cases} == {"adapt", "calibrate", "export-cells"}
    failures = []
    for name, argv, expected in lab_cases:
        if expected == "ok":  # adapting runs in the benchmark
            continue
        code, stderr = fuzz.run_case(argv)
        outcome = fuzz.verdict(expected, code, stderr)
        if outcome != "as expected":
            failures.append(f"{outcome}: {name} -> exit {code}: {stderr.strip()[-300:]}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "cache" / "local" / "registry.json").exists()
