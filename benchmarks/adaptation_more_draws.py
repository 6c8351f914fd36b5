"""More draws of the adaptation benchmark, with a chosen paired term, for settings compared
on few draws.

    python benchmarks/adaptation_more_draws.py TAG PAIRED_CELLS BATCH [--k 5] [--draws 3,4,5]
        [--weight 0.02] [--steps 300] [--base default] [--error-band 0]
        [--out adaptation_k5_more_draws.json]

Draws and scores exactly as ``benchmarks/adaptation.py`` (its ``draw``, ``adapt_once`` and
``score``), with ``adaptation.PAIRED_CELLS``, ``PAIRED_WEIGHT`` and the adapting batch set for
the run; ``--base`` adapts another model (a name or a model file) instead of the shipped
one; ``--error-band`` computes every paired error of the classifier (those the adapted model
is calibrated on and those of the scored cells; not the adapting loss) on its low band (a
Gaussian of that many model pixels; 0, the whole band, as shipped). Each draw's result is
added to benchmarks/results/OUT under ``runs``.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import adaptation as bench  # noqa: E402
from _common import RESULTS  # noqa: E402

from napari_cytodiffusion.core.model import adaptation, classifier  # noqa: E402
from napari_cytodiffusion.core.model.weights import CACHE_ENV, load_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tag")
    parser.add_argument("paired_cells", type=int)
    parser.add_argument("batch", type=int)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--draws", default="3,4,5")
    parser.add_argument("--weight", type=float, default=adaptation.PAIRED_WEIGHT)
    parser.add_argument("--steps", type=int, default=adaptation.ADAPT_STEPS)
    parser.add_argument("--base", default="default")
    parser.add_argument("--error-band", type=float, default=0.0)
    parser.add_argument("--out", default="adaptation_k5_more_draws.json")
    args = parser.parse_args()
    if args.error_band:
        classifier.error_band = lambda model: args.error_band
    adaptation.PAIRED_CELLS, adaptation.PAIRED_WEIGHT = args.paired_cells, args.weight
    defaults = list(adaptation.adapt_weights.__defaults__)
    defaults[1] = args.batch  # batch_size
    adaptation.adapt_weights.__defaults__ = tuple(defaults)
    os.environ[CACHE_ENV] = tempfile.mkdtemp()  # the adapted models are thrown away
    paths, labels, crops, groups, _ = bench.lab_cells()
    saved = RESULTS / args.out
    results = json.loads(saved.read_text()) if saved.is_file() else {"runs": []}
    for seed in (int(d) for d in args.draws.split(",")):
        picked = bench.draw(labels, groups, args.k, seed)
        name = f"k{args.k}-{args.tag}-{seed}"
        _, seconds = bench.adapt_once(
            paths, labels, picked, name, seed, steps=args.steps, base=args.base
        )
        rest = np.setdiff1d(np.arange(len(labels)), picked)
        measured = bench.score(load_model(name, "cpu"), crops[rest], labels[rest])
        measured.update(
            k=args.k,
            draw=seed,
            seconds=round(seconds, 1),
            config=args.tag,
            weight=args.weight,
            steps=args.steps,
            base=args.base,
            error_band=args.error_band,
        )
        print(json.dumps(measured), flush=True)
        results["runs"].append(measured)
        saved.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
