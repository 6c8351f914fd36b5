"""The "Generate cells" widget: synthetic cells of one class on demand.

Adds one image stack layer per run, named after the class; the layer's metadata holds a
``features`` table (index, label, seed, steps, guidance, sampler, model) so that any cell can
be made again from its seed.
"""

import time

import pandas as pd
from magicgui.widgets import ComboBox, Container, FloatSpinBox, Label, LineEdit, PushButton, SpinBox

from napari_cytodiffusion._widgets._common import (
    available_devices,
    failure_reporter,
    load_shared_model,
    show_cancelled,
)
from napari_cytodiffusion._widgets._runner import TaskRunner
from napari_cytodiffusion.core import generation
from napari_cytodiffusion.core.classes import CLASSES


class GenerateWidget(Container):
    """Class, number of cells, sampler steps, guidance and seed -> an image stack layer."""

    def __init__(self, napari_viewer):
        super().__init__()
        self._viewer = napari_viewer
        self._label = ComboBox(choices=CLASSES, value="neutrophil", label="class")
        self._count = SpinBox(value=8, min=1, max=4096, label="number of cells")
        self._steps = SpinBox(
            value=generation.DEFAULT_STEPS,
            min=1,
            max=500,
            label="sampler steps",
            tooltip="More steps follow the model more exactly but take longer; "
            "10-20 DPM-Solver++ steps are enough.",
        )
        self._guidance = FloatSpinBox(
            value=generation.DEFAULT_GUIDANCE,
            min=1.0,
            max=10.0,
            step=0.5,
            label="guidance",
            tooltip="Classifier-free guidance: 1 = none; higher follows the class more strictly "
            "at some cost in variety.",
        )
        self._seed = SpinBox(value=0, min=0, max=2**31 - 1, label="seed")
        self._sampler = ComboBox(
            choices=generation.SAMPLERS, value=generation.DEFAULT_SAMPLER, label="sampler"
        )
        self._model = LineEdit(value="default", label="model", tooltip="model name or file")
        self._device = ComboBox(choices=available_devices(), value="auto", label="device")
        self._run = PushButton(text="Generate")
        self._cancel = PushButton(text="Cancel")
        self._status = Label(value="")
        self.extend(
            [
                self._label,
                self._count,
                self._steps,
                self._guidance,
                self._seed,
                self._sampler,
                self._model,
                self._device,
                Container(widgets=[self._run, self._cancel], layout="horizontal", labels=False),
                self._status,
            ]
        )
        self._runner = TaskRunner(self._run, self._cancel, "Generating cells")
        self._run.changed.connect(self._start)
        self._cancel.changed.connect(lambda: show_cancelled(self._runner, self._status))

    def _start(self):
        options = {
            "label": self._label.value,
            "n": self._count.value,
            "steps": self._steps.value,
            "guidance": self._guidance.value,
            "seed": self._seed.value,
            "sampler": self._sampler.value,
        }
        model, device = self._model.value, self._device.value
        self._status.value = f"generating {options['n']} {options['label']} ..."
        self._runner.start(
            lambda progress: _generate(model, device, options, progress),
            self._add_layer,
            failure_reporter(self._status),
        )

    def _add_layer(self, result):
        cells, seconds = result
        features = pd.DataFrame(
            {
                "index": range(len(cells)),
                "label": cells.labels,
                "seed": cells.seeds,
                "steps": cells.steps,
                "guidance": cells.guidance,
                "sampler": cells.sampler,
                "model": cells.model_name,
            }
        )
        self._viewer.add_image(
            cells.images,
            rgb=True,
            name=f"synthetic {cells.labels[0]}",
            metadata={"features": features, "synthetic": True},
        )
        self._status.value = (
            f"{len(cells)} {cells.labels[0]} cells in {seconds:.1f} s "
            f"({seconds / len(cells):.2f} s per cell)"
        )


def _generate(model_name, device, options, progress):
    model = load_shared_model(model_name, device)
    started = time.perf_counter()
    cells = generation.generate_cells(model, progress=progress, **options)
    return cells, time.perf_counter() - started
