"""The Segment widget: every white cell, red cell and platelet of the open smear.

Adds, all at once when the work is done: a Labels layer of white cells whose ``features`` (one
row per cell, ``index`` = label) show on hover, a Labels layer of red cells and a Points layer
of platelets, and on request a Labels layer of the white cells' nuclei (each with its cell's
label, drawn as outlines), all aligned with the image layer. Each layer's metadata names the
image it was made for (``source``, and ``image_id``: the image whatever it is renamed to) and
its cells (``cells``: white, red, platelets or nuclei). That is how a rerun finds its earlier
layers, renamed or not, and how Classify cells picks the right white cells.
"""

import numpy as np
from magicgui.widgets import CheckBox, ComboBox
from napari.layers import Image
from napari.utils.notifications import show_error, show_info

from napari_cytodiffusion._widgets._common import (
    DockForm,
    RunRow,
    full_resolution,
    layer_id,
    linked_layer,
    no_smear_message,
    rbc_diameter_field,
    removed_layer,
    rgb_images,
    update_or_add_in_steps,
)


class SegmentWidget(DockForm):
    """Segment the cells of a blood-smear image layer."""

    def __init__(self, napari_viewer):
        super().__init__()
        self._viewer = napari_viewer
        self._image = ComboBox(
            label="image", choices=self._image_layers, tooltip="The RGB image of the smear."
        )
        self._diameter = rbc_diameter_field(
            "Typical red-cell diameter in pixels; 0 = estimate it from the image. Every size "
            "threshold scales with it."
        )
        self._nuclei = CheckBox(
            text="nuclei layer",
            value=False,
            tooltip="Also add the nucleus of each white cell (outlined, with its cell's label), "
            "for nucleus-to-cell ratios.",
        )
        row = RunRow("Segmenting cells", "Segment")
        self._run, self._cancel, self._summary = row.buttons[0], row.cancel, row.status
        self._runner = row.runner
        self._run.tooltip = "Find the white cells, red cells and platelets of the image."
        self.add(self._image, self._diameter, self._nuclei, row)
        self._run.changed.connect(lambda *_: self.start(self._image.value))
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(lambda *_: self.reset_choices())

    @property
    def runner(self):
        return self._runner

    def _image_layers(self, _=None):
        return rgb_images(self._viewer)

    def start(self, layer):
        """Segment ``layer`` in a worker thread; returns the worker, or None if refused."""
        if layer is None:
            show_error(no_smear_message(self._viewer, "Segment"))
            return None
        if not isinstance(layer, Image):
            show_error(
                f"'{layer.name}' is a {type(layer).__name__} layer; choose the RGB image "
                "layer of the smear."
            )
            return None
        if not layer.rgb:
            show_error(
                f"'{layer.name}' is not an RGB colour image (shape {layer.data.shape}); cell "
                "segmentation needs the colour image of a stained smear."
            )
            return None
        data = full_resolution(layer)
        diameter, nuclei = self._diameter.value or None, self._nuclei.value

        def work(progress):
            from napari_cytodiffusion.core.tasks.segment import segment

            found = segment(np.asarray(data), rbc_diameter=diameter, progress=progress)
            # Made here, in the worker: on a large image that takes a while.
            segmentation = found.segmentation
            return found, segmentation.rbc_labels, segmentation.nucleus_labels if nuclei else None

        return self._runner.start(
            work,
            lambda result: self._show(layer, *result),
            text=f"segmenting {layer.name}",
            removed_input=lambda: removed_layer(self._viewer, layer),
        )

    def _show(self, image, found, rbc_labels, nucleus_labels):
        """Show the result, one layer per turn of the event loop (see ``_runner``); an
        earlier run's layers of the same image take the new data in place."""
        result, name = found.segmentation, image.name
        placement = {"scale": image.scale[-2:], "translate": image.translate[-2:]}

        def link(cells):
            return {"image_id": layer_id(image), "cells": cells}

        def metadata(cells):
            return {"source": name, **link(cells)}

        earlier_nuclei = linked_layer(self._viewer, "labels", link("nuclei"))
        if nucleus_labels is None and earlier_nuclei is not None:
            self._viewer.layers.remove(earlier_nuclei.name)  # not asked for this time
        platelets = result.table("platelet")
        yield from update_or_add_in_steps(
            self._viewer,
            "labels",
            rbc_labels,
            f"{name} red cells",
            result.table("rbc"),
            metadata("red"),
            link=link("red"),
            opacity=0.35,
            **placement,
        )
        yield from update_or_add_in_steps(
            self._viewer,
            "points",
            platelets[["centroid_row", "centroid_col"]].to_numpy(float),
            f"{name} platelets",
            platelets,
            metadata("platelets"),
            link=link("platelets"),
            size=max(4.0, 0.5 * result.rbc_diameter),
            face_color="transparent",
            border_color="#00ff66",
            border_width=0.15,
            **placement,
        )
        if nucleus_labels is not None:
            yield from update_or_add_in_steps(
                self._viewer,
                "labels",
                nucleus_labels,
                f"{name} nuclei",
                result.table("wbc"),  # a nucleus has its white cell's label
                metadata("nuclei"),
                settings=[("contour", 1)],
                link=link("nuclei"),
                **placement,
            )
        wbc = yield from update_or_add_in_steps(
            self._viewer,
            "labels",
            result.wbc_labels,
            f"{name} white cells",
            result.table("wbc"),
            # Classify cells picks these for this image only (by its id).
            {"rbc_diameter": result.rbc_diameter, **metadata("white")},
            link=link("white"),
            opacity=0.6,
            **placement,
        )
        self._viewer.layers.selection.active = wbc
        self._summary.value = f"done: {found.summary()}"
        show_info(f"Segmented '{name}': {found.summary()}.")
