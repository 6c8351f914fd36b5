"""Batch-analysis benchmarks: memory against image size, throughput against workers, the
overhead of the distributed path, and a kill test.

    python benchmarks/analysis.py --parts memory,workers,kill

Parts (results merged into benchmarks/results/analysis.json and .md):

* memory: peak resident memory of ``analyze_smear`` in a fresh process on mosaics of real CBC
  test fields of 1k², 5k² and 20k² pixels, saved as tiled, compressed TIFFs and read lazily.
* workers: cells/s and megapixels/s of ``analyze`` on the same 5k² slide, in process (no
  cluster: ``analyze_smear`` and ``write_smear``, as the Analyze widget runs it) and on a
  LocalCluster of 1 and 2 worker processes (started for the run, as the command does); the
  overhead of one worker against the in-process run.
* kill: 20 CBC test fields analysed by the command, killed with SIGKILL at random moments and
  run again until it finishes; every finished smear is intact and skipped, and the outputs
  equal those of an uninterrupted run.
"""

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import DATA, RESULTS  # noqa: E402

# The peak is read from /proc (VmHWM), which starts afresh in a new program; getrusage's
# maximum would carry over the memory of the process that started this one.
MEMORY_SCRIPT = """
import json, sys, time
from napari_cytodiffusion.core.io import open_image
from napari_cytodiffusion.core.model.weights import load_model
from napari_cytodiffusion.core.tasks.analyze import analyze_smear
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
model = load_model("default", "cpu")
base = peak()
started = time.perf_counter()
result = analyze_smear(open_image(sys.argv[1]), model, "slide")
print(json.dumps({"seconds": time.perf_counter() - started, "cells": len(result.cells),
                  "peak_rss_mib": peak(), "rss_after_model_mib": base}))
"""


def mosaic(side):
    """A side x side mosaic of real CBC test fields (rows of fields, mirrored alternately)."""
    from PIL import Image

    fields = [
        np.asarray(Image.open(p).convert("RGB"))
        for p in sorted((DATA / "cbc" / "test" / "images").glob("*.jpg"))
    ]
    rows, index = [], 0
    while sum(r.shape[0] for r in rows) < side:
        row = []
        while sum(t.shape[1] for t in row) < side:
            field = fields[index % len(fields)]
            row.append(field if index % 2 else field[:, ::-1])
            index += 1
        rows.append(np.concatenate(row, axis=1)[:, :side])
    return np.ascontiguousarray(np.concatenate(rows, axis=0)[:side])


def write_slide(side, folder):
    """The mosaic as a tiled, zlib-compressed TIFF, written in row bands (bounded memory)."""
    import tifffile

    path = Path(folder) / f"slide_{side}.tif"
    if not path.exists():
        image = mosaic(side)
        tifffile.imwrite(path, image, tile=(512, 512), compression="zlib")
    return path


def part_memory(args, saved=None):
    """Sides in ``args.sides``; the rows of other sides saved before are kept (with their
    dates)."""
    sides = [int(side) for side in args.sides.split(",")]
    rows = [row for row in (saved or {}).get("runs", []) if row["side"] not in sides]
    for side in sides:
        path = write_slide(side, args.cache)
        output = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, str(path)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        measured = json.loads(output.strip().splitlines()[-1])
        date = time.strftime("%Y-%m-%d %H:%M")
        rows.append({"side": side, "megapixels": side * side / 1e6, **measured, "date": date})
        print(rows[-1], flush=True)
    return {"runs": sorted(rows, key=lambda row: row["side"]), "environment": environment()}


def part_workers(args, saved=None):
    """Each setting run ``args.repeats`` times, the settings taking turns so that a busy
    moment of the machine does not fall on one setting alone; medians reported."""
    path = write_slide(args.side, args.cache)
    megapixels = args.side**2 / 1e6
    settings = {"in process (no cluster)": None}
    settings.update({f"LocalCluster, {n} worker(s)": n for n in (1, 2)})
    seconds = {name: [] for name in settings}
    for _ in range(args.repeats):
        for name, workers in settings.items():
            taken, cells = _run_analysis(path, workers, args.tile)
            seconds[name].append(taken)
            print(name, round(taken, 1), flush=True)
    runs = [
        {**_throughput(name, float(np.median(times)), cells, megapixels), "all_seconds": times}
        for name, times in ((n, [round(t, 1) for t in seconds[n]]) for n in settings)
    ]
    overhead = runs[1]["seconds"] / runs[0]["seconds"] - 1
    return {
        "slide": f"{args.side} x {args.side} mosaic of CBC test fields (tiled TIFF), analysed in "
        f"{args.tile} px tiles",
        "repeats": args.repeats,
        "runs": runs,
        "distributed_overhead_one_worker": round(overhead, 3),
        "environment": environment(),
    }


def _run_analysis(path, workers, tile_size):
    """(seconds, cells) of one smear analysed and written: in this process (``workers``
    None: the Analyze widget's run) or by ``analyze_files`` on a LocalCluster it starts."""
    from napari_cytodiffusion.core.io import open_image
    from napari_cytodiffusion.core.model.weights import shared_model
    from napari_cytodiffusion.core.report import write_smear
    from napari_cytodiffusion.core.tasks.analyze import BatchRequest, analyze_files, analyze_smear

    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        if workers is None:
            model = shared_model("default", "cpu")
            analysis = analyze_smear(open_image(path), model, "slide", tile_size=tile_size)
            write_smear(analysis, Path(out) / "slide", path)
            cells = len(analysis.cells)
        else:
            analyze_files(BatchRequest(paths=[path], out=out, workers=workers, tile_size=tile_size))
            cells = len(_cells_written(Path(out)))
        return time.perf_counter() - started, cells


def _cells_written(out):
    import pandas as pd

    return pd.read_csv(next(out.glob("*/cells.csv")))


def _throughput(setting, seconds, cells, megapixels):
    return {
        "setting": setting,
        "seconds": round(seconds, 1),
        "cells_per_second": round(cells / seconds, 2),
        "megapixels_per_second": round(megapixels / seconds, 3),
    }


MIN_KILLS = 3


def part_kill(args, saved=None):
    """Kill ``analyze`` at random moments, run again, compare with an uninterrupted run."""
    fields = sorted((DATA / "cbc" / "test" / "images").glob("*.jpg"))[: args.smears]
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as folder:
        smears = Path(folder) / "smears"
        smears.mkdir()
        for field in fields:
            (smears / field.name).write_bytes(field.read_bytes())
        reference = Path(folder) / "reference"
        started = time.perf_counter()
        _command(smears, reference)
        reference_seconds = time.perf_counter() - started
        killed = Path(folder) / "killed"
        kills, checks = 0, []
        while True:
            process = _command(smears, killed, wait=False)
            # A resumed run is shorter than the first (its finished smears are skipped, its
            # imports are warm), so the first kills come early, within a quarter of a full
            # run; later ones anywhere in its first half.
            share = 0.25 if kills < MIN_KILLS else 0.5
            delay = rng.uniform(3, max(4, share * reference_seconds))
            try:
                process.wait(timeout=delay)
                break
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                kills += 1
                checks.append(_intact(killed))
        same = _same_outputs(reference, killed)
    return {
        "smears": len(fields),
        "uninterrupted_seconds": round(reference_seconds, 1),
        "kills": kills,
        "finished_folders_intact_after_every_kill": all(checks),
        "outputs_identical_to_uninterrupted_run": same,
    }


def _command(smears, out, wait=True):
    argv = [sys.executable, "-m", "napari_cytodiffusion", "analyze", str(smears)]
    argv += ["--out", str(out), "--workers", "2"]
    if wait:
        return subprocess.run(argv, check=True, capture_output=True)
    return subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def _intact(out):
    """Every folder marked finished holds all its files, readable; no partial file is left
    under a final name."""
    import pandas as pd

    for marker in Path(out).glob("*/done.json"):
        folder = marker.parent
        try:
            pd.read_csv(folder / "cells.csv")
            json.loads((folder / "triage.json").read_text())
            if not (folder / "report.html").read_text().rstrip().endswith("</html>"):
                return False
        except (OSError, ValueError):
            return False
    return True


def _same_outputs(first, second):
    names = ("cells.csv", "differential.csv", "triage.json", "report.html")
    folders = sorted(p.name for p in Path(first).iterdir() if p.is_dir())
    if folders != sorted(p.name for p in Path(second).iterdir() if p.is_dir()):
        return False
    return (
        all(
            (Path(first) / f / n).read_bytes() == (Path(second) / f / n).read_bytes()
            for f in folders
            for n in names
        )
        and (Path(first) / "summary.csv").read_bytes()
        == (Path(second) / "summary.csv").read_bytes()
    )


def environment():
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average_at_end": round(os.getloadavg()[0], 2),
    }


def write_markdown(results):
    lines = ["# Batch-analysis benchmarks", "", "Made by `benchmarks/analysis.py`.", ""]
    if "memory" in results:
        lines += [
            "## Peak memory against image size",
            "",
            "`analyze_smear` on a tiled TIFF read lazily, in a fresh process (this 2-core CPU).",
            "",
            "| image | megapixels | white cells | seconds | peak memory (MiB) | measured |",
            "|---|---|---|---|---|---|",
        ]
        for run in results["memory"]["runs"]:
            lines.append(
                f"| {run['side']} x {run['side']} | {run['megapixels']:.0f} | {run['cells']} | "
                f"{run['seconds']:.0f} | {run['peak_rss_mib']:.0f} | "
                f"{run.get('date', results['memory'].get('date', ''))} |"
            )
        lines.append("")
    if "workers" in results:
        part = results["workers"]
        lines += [
            "## Throughput against workers",
            "",
            f"{part['slide']}; median of {part.get('repeats', 1)} runs of each setting, taking "
            "turns; overhead of one LocalCluster worker (started for the run, as the command "
            "does) against the in-process run: "
            f"{100 * part['distributed_overhead_one_worker']:.0f} % (target <= 10 %).",
            "",
            "| setting | seconds (median) | every run (s) | cells/s | megapixels/s |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['setting']} | {r['seconds']} | {', '.join(map(str, r.get('all_seconds', [])))} "
            f"| {r['cells_per_second']} | {r['megapixels_per_second']} |"
            for r in part["runs"]
        ]
        lines.append("")
    if "kill" in results:
        part = results["kill"]
        lines += [
            "## Kill test",
            "",
            f"{part['smears']} CBC test fields, `analyze` killed (SIGKILL) {part['kills']} times "
            "at random moments and run again until it finished. Finished folders intact after "
            f"every kill: {part['finished_folders_intact_after_every_kill']}; final outputs "
            f"identical to an uninterrupted run: {part['outputs_identical_to_uninterrupted_run']}.",
            "",
        ]
    (RESULTS / "analysis.md").write_text("\n".join(lines))


PARTS = {"memory": part_memory, "workers": part_workers, "kill": part_kill}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="memory,workers,kill", help=",".join(PARTS))
    parser.add_argument("--side", type=int, default=5000, help="slide side for 'workers'")
    parser.add_argument("--sides", default="1000,5000,20000", help="slide sides for 'memory'")
    parser.add_argument("--smears", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each 'workers' setting")
    # Smaller than the default tiles, so that a 5k slide has tiles enough for two workers.
    parser.add_argument("--tile", type=int, default=2048, help="tile side for 'workers'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="/tmp/cytodiffusion_analysis_bench")
    args = parser.parse_args()
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    path = RESULTS / "analysis.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in args.parts.split(","):
        results[name] = PARTS[name](args, results.get(name))
        results[name]["date"] = time.strftime("%Y-%m-%d %H:%M")
        path.write_text(json.dumps(results, indent=1))
        write_markdown(results)


if __name__ == "__main__":
    main()
