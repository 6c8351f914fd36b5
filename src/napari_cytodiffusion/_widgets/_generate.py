"""The "Generate cells" widget: synthetic cells of one class on demand.

Adds one grid of cells per run, named after the class, beside what the viewer shows (at the
smear's scale when it is known; see ``_grid``), and a tiles layer over it whose features
(class, seed, steps, guidance, sampler, model) show on hover, so that any cell can be made
again from its seed. The grid's metadata holds the same ``features`` table.
"""

from magicgui.widgets import ComboBox, SpinBox

from napari_cytodiffusion._widgets._common import (
    DockForm,
    ModelFields,
    RunRow,
    sampler_fields,
    select_then_show,
)
from napari_cytodiffusion._widgets._grid import add_grid, add_tiles, tile
from napari_cytodiffusion.core.model import sampling


class GenerateWidget(DockForm):
    """Class, number of cells, sampler steps, guidance and seed -> a grid of cells."""

    def __init__(self, napari_viewer):
        super().__init__()
        self._viewer = napari_viewer
        self._fields = ModelFields(
            seed_tooltip="Cell i gets seed + i: the same seed, the same cells."
        )
        classes = self._fields.classes()
        self._label = ComboBox(
            choices=classes,
            value="neutrophil" if "neutrophil" in classes else classes[0],
            label="class",
            tooltip="The class of the cells to generate.",
        )
        self._fields.follow_classes(self._label)
        self._count = SpinBox(
            value=8, min=1, max=4096, label="number of cells", tooltip="Cells to generate."
        )
        self._steps, self._guidance = sampler_fields("10-20 DPM-Solver++ steps are enough")
        self._sampler = ComboBox(
            choices=sampling.SAMPLERS,
            value=sampling.DEFAULT_SAMPLER,
            label="sampler",
            tooltip="dpm++2m: second order, fewer steps for the same quality; ddim: first order.",
        )
        self._device, self._seed = self._fields.device, self._fields.seed
        row = RunRow("Generating cells", "Generate")
        self._run, self._cancel, self._status = row.buttons[0], row.cancel, row.status
        self._runner = row.runner
        self._run.tooltip = "Generate the cells; they appear as a grid beside the smear."
        self.add(
            self._label,
            self._count,
            self._steps,
            self._guidance,
            self._sampler,
            *self._fields.widgets,
            row,
        )
        self._run.changed.connect(self._start)

    def _start(self):
        options = {
            "label": self._label.value,
            "n": self._count.value,
            "steps": self._steps.value,
            "guidance": self._guidance.value,
            "seed": self._seed.value,
            "sampler": self._sampler.value,
        }
        choice = self._fields.choice()

        def job(progress):
            from napari_cytodiffusion.core.tasks.generate import generate

            cells = generate(choice.load(progress), progress=progress, **options)
            return cells, tile(cells.images), cells.features()

        text = f"generating {options['n']} {options['label']}"
        self._runner.start(job, self._add_layers, text=text)

    def _add_layers(self, result):
        """Main thread: the grid, then its tiles, then their first draw, one per turn of the
        event loop."""
        from napari_cytodiffusion.core.tasks.generate import summary

        cells, tiled, features = result
        name = f"synthetic {cells.labels[0]}"
        grid = add_grid(self._viewer, tiled, name, features, {"synthetic": True})
        yield
        tiles = add_tiles(self._viewer, grid, tiled, features)
        yield
        yield from select_then_show(self._viewer, tiles)  # hover shows its features
        self._status.value = f"done: {summary(cells)}"
