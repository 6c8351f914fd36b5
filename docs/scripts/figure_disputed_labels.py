"""Figure: the WBC dataset 1 cells that adapted models called another class than labelled, with
confidence (docs/images/dataset1_disputed_labels.png), for a haematologist to look at.

    python docs/scripts/figure_disputed_labels.py

Reads the wrong calls left unflagged in benchmarks/results/adaptation_review_rules.json (the
shipped way of adapting, draws 3-5 at K = 10 and 25); each cell is shown as imaged, with its
label, the call and on how many draws it was made.
"""

import json
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[2]
DATASET = REPO.parent / "shared" / "data" / "segmentation_wbc_dataset1"
TILE, CAPTION = 160, 34


def disputed():
    """(image, label, call) -> number of draws, most frequent first."""
    results = json.loads((REPO / "benchmarks/results/adaptation_review_rules.json").read_text())
    counts = Counter()
    for row in results["rows"]:
        for entry in row["as adapted"]["confidently_wrong_cells"]:
            image, rest = entry.split(": ")
            label, call = rest.split(" called ")
            counts[(image, label, call)] += 1
    return counts.most_common()


def main():
    cells = disputed()
    columns = 6
    rows = -(-len(cells) // columns)
    figure = Image.new("RGB", (columns * TILE, rows * (TILE + CAPTION)), "white")
    draw = ImageDraw.Draw(figure)
    for i, ((image, label, call), draws) in enumerate(cells):
        x, y = (i % columns) * TILE, (i // columns) * (TILE + CAPTION)
        with Image.open(DATASET / image) as cell:
            figure.paste(cell.convert("RGB").resize((TILE, TILE)), (x, y))
        caption = f"{image[:3]}: labelled {label}\ncalled {call} ({draws} draw{'s' * (draws > 1)})"
        draw.multiline_text((x + 4, y + TILE + 2), caption, fill="black")
    out = REPO / "docs/images/dataset1_disputed_labels.png"
    figure.save(out)
    print(out)


if __name__ == "__main__":
    main()
