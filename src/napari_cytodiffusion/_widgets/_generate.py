"""The "Generate cells" widget: synthetic cells of one class on demand.

Adds one image stack layer per run, named after the class; the layer's metadata holds a
``features`` table (index, label, seed, steps, guidance, sampler, model) so that any cell can
be made again from its seed.
"""

from magicgui.widgets import ComboBox, Container, SpinBox

from napari_cytodiffusion._widgets._common import ModelFields, RunRow, sampler_fields
from napari_cytodiffusion.core.model import sampling


class GenerateWidget(Container):
    """Class, number of cells, sampler steps, guidance and seed -> an image stack layer."""

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
        self._model, self._device, self._seed = self._fields.widgets
        row = RunRow("Generating cells", "Generate")
        self._run, self._cancel, self._status = row.buttons[0], row.cancel, row.status
        self._runner = row.runner
        self.extend(
            [
                self._label,
                self._count,
                self._steps,
                self._guidance,
                self._sampler,
                *self._fields.widgets,
                row,
            ]
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
        self._status.value = f"generating {options['n']} {options['label']} ..."

        def job(progress):
            from napari_cytodiffusion.core.tasks.generate import generate

            return generate(choice.load(), progress=progress, **options)

        self._runner.start(job, self._add_layer)

    def _add_layer(self, cells):
        from napari_cytodiffusion.core.tasks.generate import summary

        self._viewer.add_image(
            cells.images,
            rgb=True,
            name=f"synthetic {cells.labels[0]}",
            metadata={"features": cells.features(), "synthetic": True},
        )
        self._status.value = summary(cells)
