"""Pieces every widget shares, built once: the model / device / seed fields, the run row
(buttons, Cancel, a status line) with its task runner, and one loaded model per
(name, device) for all widgets."""

import sys
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    PushButton,
    SpinBox,
)
from napari.layers import Image, Labels, Points
from napari.utils.notifications import show_error
from qtpy.QtCore import QEvent, QSize, Qt, QTimer
from qtpy.QtGui import QKeySequence
from qtpy.QtWidgets import QComboBox, QFrame, QScrollArea, QShortcut, QSizePolicy, QWidget

from napari_cytodiffusion._widgets._idle import idle_collector
from napari_cytodiffusion._widgets._runner import TaskRunner
from napari_cytodiffusion._widgets._torch_import import (
    listed_devices,
    start_torch_import,
    torch_importing,
)
from napari_cytodiffusion.core import devices

NEW_CLASS_TIP = (
    "A class the model does not have, such as blast or smudge cell: New class gives it to "
    "the selected cell, and Adapt / calibrate model can learn it (other classes become new "
    "classes)."
)


def camera(viewer):
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    return getattr(viewer, "scene", viewer).camera


@dataclass(frozen=True)
class ModelChoice:
    """The model a run uses, read from the fields on the main thread."""

    name: str
    device: str

    def load(self, progress=None):
        """The loaded model (shared by all widgets); call it in the worker."""
        from napari_cytodiffusion.core.model.weights import shared_model

        return shared_model(self.name, self.device, progress)


def rgb_images(viewer):
    """The RGB image layers of ``viewer``: the smears and cells a widget can work on (not the
    uncertainty or heat maps the widgets add as single-channel images)."""
    return [layer for layer in viewer.layers if isinstance(layer, Image) and layer.rgb]


def full_resolution(layer):
    """An image layer's pixels at full resolution, not loaded (level 0 of a multiscale
    layer, whose ``np.asarray`` would give its smallest level)."""
    return layer.data[0] if layer.multiscale else layer.data


def no_smear_message(viewer, action):
    """Why ``action`` (Segment, Classify...) has no smear to work on, and what to do."""
    grey = [layer.name for layer in viewer.layers if isinstance(layer, Image) and not layer.rgb]
    if grey:
        return (
            f"'{grey[0]}' is not an RGB colour image; {action} needs the colour image of the "
            "smear: open it as RGB."
        )
    return f"Open a blood-smear image first: {action} works on an RGB image layer."


def removed_layer(viewer, *layers):
    """The name of the first of ``layers`` (None entries skipped) no longer in ``viewer``."""
    for layer in layers:
        if layer is not None and layer not in viewer.layers:
            return layer.name
    return None


@contextmanager
def added_unselected(viewer):
    """Layers added inside are not selected as napari adds them; select and show each in later
    turns of the event loop with :func:`select_then_show`.

    napari selects a new layer in the turn it adds it, which switches and repaints the layer
    controls: 0.01-0.02 s more in a turn that already takes 0.05-0.08 s in software OpenGL.
    (It is napari's private switch, reached past a plugin viewer's proxy; a napari without it
    selects as before.)
    """
    layers = getattr(viewer.layers, "__wrapped__", viewer.layers)
    switch = hasattr(layers, "_activate_on_insert")
    if switch:
        layers._activate_on_insert = False
    try:
        yield
    finally:
        if switch:
            layers._activate_on_insert = True


def select(viewer, layer):
    """Make ``layer`` the selected layer, unless a person removed it while the steps ran."""
    if layer in viewer.layers:
        viewer.layers.selection.active = layer


def select_then_show(viewer, layer, visible=True):
    """Steps of a result handler (``yield from``): select ``layer`` as napari would have when
    adding it, then show it (its first draw: 0.01-0.07 s, a points layer's the longest), each
    in a turn of its own."""
    select(viewer, layer)
    yield
    if visible:
        layer.visible = True
        yield


def direct_colormap(colours, dtype=None):
    """napari's colour map of ``colours`` ({label: colour}), for labels of ``dtype``.

    To draw 8- or 16-bit labels napari first maps every value of the dtype to its colour (all
    65,536 for 16-bit labels, segmentation's) in a Python loop: 0.03-0.05 s on the main thread
    at a layer's first draw and at every new colour map. For an unsigned ``dtype`` that table
    is filled here at once, in napari's own cache (a napari without it builds its own)."""
    from napari.utils.colormaps import DirectLabelColormap

    colormap = DirectLabelColormap(color_dict=colours)
    if dtype is not None:
        _fill_colour_table(colormap, np.dtype(dtype))
    return colormap


def _fill_colour_table(colormap, dtype):
    cache = getattr(colormap, "_cache_mapping", None)
    if cache is None or dtype.kind != "u" or dtype.itemsize > 2:
        return
    table = np.tile(np.asarray(colormap.default_color, np.float32), (256**dtype.itemsize, 1))
    for label, colour in colormap.color_dict.items():
        if label is not None and 0 <= label < len(table):
            table[label] = colour
    cache[(dtype, dtype)] = table  # napari's key: (data dtype, texture dtype)


# The layer kinds update_or_add makes and finds.
LAYER_TYPES = {"image": Image, "labels": Labels, "points": Points}


def layer_id(layer):
    """A text that names ``layer`` and no other, whatever it is renamed to (napari's
    ``unique_id``): what a result's metadata records of the image it was made of."""
    return str(layer.unique_id)


def linked_layer(viewer, kind, link):
    """The first ``kind`` layer whose metadata holds every item of ``link`` ({key: text}), or
    None.

    Ties a result's layers to their image and to each other by what they record, not by
    names: a person may rename a layer, and a name made from another layer's name may then
    name an unrelated one."""
    for layer in viewer.layers:
        if isinstance(layer, LAYER_TYPES[kind]) and all(
            isinstance(layer.metadata.get(key), str) and layer.metadata[key] == value
            for key, value in link.items()
        ):
            return layer
    return None


def result_link(image_id, shows):
    """The metadata that ties a result layer of Classify cells to the image it was made of
    (``image_id``, see :func:`layer_id`): ``shows`` is "classes", "uncertainty" or "needs
    review" (or "reviewed": Annotate cells' markers)."""
    return {"image_id": image_id, "shows": shows}


def review_markers(viewer, classes_layer):
    """The review markers (a Points layer) Classify cells made with ``classes_layer``, whatever
    either is named, or None."""
    image_id = classes_layer.metadata.get("image_id", "")
    return linked_layer(viewer, "points", result_link(image_id, "needs review"))


def image_of(viewer, layer):
    """The image layer that ``layer``'s metadata ties it to (``image_id``, see
    :func:`layer_id`), whatever either is named; None where it is no longer open."""
    image_id = layer.metadata.get("image_id")
    images = (image for image in viewer.layers if isinstance(image, Image))
    return next((image for image in images if layer_id(image) == image_id), None)


def made_for(layer, image):
    """Whether ``layer`` numbers the white cells this plugin found for ``image`` (Segment
    cells' white cells, Classify cells' classes, a grid's tiles): by the image's id, so
    whatever either is named, and never for another image opened under the same name."""
    return (
        isinstance(layer, Labels)
        and image is not None
        and layer.metadata.get("image_id") == layer_id(image)
        and layer.metadata.get("cells", "white") == "white"
        and tuple(layer.data.shape) == tuple(image.data.shape[:2])
    )


def update_or_add(viewer, kind, data, name, features, metadata, link=None, **new_only):
    """The ``kind`` ("image", "labels" or "points") layer showing ``data``.

    An earlier run's layer takes the new data, features (None for an image) and metadata in
    place: a rerun keeps what the person set (opacity, visibility, place in the list), and
    costs napari a fraction of removing the layer and adding a new one (0.05 s against 0.13 +
    0.1-0.3 s on a 2-core CPU drawing in software). The earlier layer is the one named
    ``name``, or with ``link`` the one :func:`linked_layer` finds, whatever its name; one that
    no longer fits (labels or an image of another shape) is replaced. A layer of another kind
    is never removed: the new one then gets a name of its own (napari adds " [1]").
    ``new_only`` styles a new layer; of it, ``scale``, ``translate`` and a points layer's
    ``size`` and ``border_color`` are applied to an updated one too (they may differ point by
    point, and napari would give new points the first ones).
    """
    layer = _fitting_layer(viewer, kind, data, name, link)
    if layer is None:
        earlier = _earlier_layer(viewer, kind, name, link)
        if earlier is not None:
            viewer.layers.remove(earlier.name)
        add = getattr(viewer, f"add_{kind}")
        table = {} if features is None else {"features": features}
        return add(data, name=name, metadata=metadata, **table, **new_only)
    layer.data = data
    if features is not None:
        layer.features = features
    layer.metadata = metadata
    for key in ("scale", "translate", "size", "border_color"):
        if key in new_only:
            setattr(layer, key, new_only[key])
    return layer


def update_or_add_in_steps(
    viewer, kind, data, name, features, metadata, settings=(), link=None, **new_only
):
    """:func:`update_or_add` as steps of a result handler: ``layer = yield from ...``.

    A new layer is added hidden and shown in the next step. napari draws a layer for the first
    time (shaders, textures; 0.01-0.05 s in software OpenGL) in the turn it becomes visible,
    so adding it (0.04-0.07 s), selecting it and drawing it are three shorter stalls instead of
    one (see :func:`added_unselected`).
    ``settings`` (attribute, value) pairs are set on a new and an updated layer alike, before
    it is shown.
    """
    new = _fitting_layer(viewer, kind, data, name, link) is None
    visible = new_only.pop("visible", True)
    with added_unselected(viewer):
        layer = update_or_add(
            viewer, kind, data, name, features, metadata, link, visible=False, **new_only
        )
    for attribute, value in settings:
        setattr(layer, attribute, value)
    yield
    if new:
        yield from select_then_show(viewer, layer, visible)
    return layer


def _earlier_layer(viewer, kind, name, link):
    """The ``kind`` layer ``link`` finds (see :func:`linked_layer`), or without a link the
    layer ``name`` if it is of ``kind``; else None.

    (A plugin's viewer hands out a new proxy of a layer at each look-up, so layers are not
    compared by identity.)"""
    if link is not None:
        return linked_layer(viewer, kind, link)
    layer = viewer.layers[name] if name in viewer.layers else None
    return layer if isinstance(layer, LAYER_TYPES[kind]) else None


def _fitting_layer(viewer, kind, data, name, link=None):
    """The earlier layer (see :func:`_earlier_layer`) if it can take ``data`` in place
    (labels and images: of its shape), else None."""
    layer = _earlier_layer(viewer, kind, name, link)
    if layer is None:
        return None
    fits = kind == "points" or (not layer.multiscale and layer.data.shape == data.shape)
    return layer if fits else None


# torch's import starts this long after a device field is made, when its widget is up.
IMPORT_DELAY_S = 1.0


def device_field():
    """The device choice: ``auto`` and the devices this machine has. Listing them needs torch;
    until it is imported (in the background, once the widget is up), ``auto`` and ``cpu``."""
    imported = "torch" in sys.modules and not torch_importing()
    combo = ComboBox(
        label="device",
        choices=devices.available_devices() if imported else ["auto", "cpu"],
        value="auto",
        tooltip="auto: a GPU when there is one, else the CPU.",
    )
    if not imported:
        _offer_devices_when_imported(combo)
    return combo


def _offer_devices_when_imported(combo):
    timer = QTimer(combo.native)  # closed with its widget
    timer.setInterval(100)
    made = time.monotonic()

    def offer():
        if time.monotonic() - made < IMPORT_DELAY_S:
            return
        start_torch_import()
        if torch_importing():
            return
        timer.stop()
        # torch's objects: collected at the next quiet moment, not in the first task's work.
        idle_collector().request()
        if listed_devices() is not None:  # else torch's import failed: a run reports why
            value = combo.value
            combo.choices = listed_devices()
            combo.value = value

    timer.timeout.connect(offer)
    timer.start()


def strategy_field():
    """How the classifier spends its trials: adaptive or exhaustive."""
    return ComboBox(
        label="strategy",
        choices=["adaptive", "exhaustive"],
        tooltip="adaptive: drop clearly worse classes early (about 12x faster); "
        "exhaustive: every trial for every class.",
    )


def bind_labelling(layer, classes, actions):
    """Let a person call the labels of ``layer``: a click (pan/zoom mode) calls
    ``actions.select(label value)`` for the label under it, keys 1-9 ``actions.set_label``
    with the n-th of ``classes``, ``n`` ``actions.next_flagged()`` and ``u``
    ``actions.undo()``. Returns a function that takes all of them off the layer again, so that
    an earlier layer never acts on the one shown now."""

    def on_click(layer, event):
        if layer.mode != "pan_zoom":
            return
        value = layer.get_value(event.position, world=True)
        if value:
            actions.select(int(value))

    keys = {
        str(number): (lambda _layer, name=name: actions.set_label(name))
        for number, name in enumerate(classes[:9], 1)
    }
    keys["n"] = lambda _layer: actions.next_flagged()
    keys["u"] = lambda _layer: actions.undo()
    layer.mouse_drag_callbacks.append(on_click)
    for key, action in keys.items():
        layer.bind_key(key, action, overwrite=True)

    def unbind():
        if on_click in layer.mouse_drag_callbacks:
            layer.mouse_drag_callbacks.remove(on_click)
        for key, action in keys.items():
            unbound = layer.bind_key(key, None)
            if unbound is not None and unbound is not action:
                layer.bind_key(key, unbound)  # bound since by someone else: theirs stays

    return unbind


def new_class_fields():
    """A field for a class the model lacks (blast, smudge cell) and the New class button."""
    field = LineEdit(label="new class", tooltip=NEW_CLASS_TIP)
    field.native.setPlaceholderText("e.g. blast")
    button = PushButton(text="New class", tooltip="Give the selected cell the class typed.")
    return field, button


def new_class_name(text):
    """``text`` written as a class name, or None after telling the person why not (empty,
    or artefact / unknown, which are buttons, not classes)."""
    from napari_cytodiffusion.core.annotations import DELETED, NOT_CELL_CLASSES
    from napari_cytodiffusion.core.classes import class_key

    label = class_key(text)
    if not label.strip("_"):
        show_error("Type the new class's name first, for example blast.")
    elif label in NOT_CELL_CLASSES:
        show_error(f"Use the {label.capitalize()} button for that; it is not a class.")
    elif label == DELETED:
        show_error(f"'{DELETED}' marks a deleted cell; it cannot name a class.")
    else:
        return label
    return None


def rbc_diameter_field(tooltip):
    """The red-cell diameter in pixels; 0 means estimate it."""
    return FloatSpinBox(
        value=0.0, min=0.0, max=1000.0, step=0.5, label="red-cell diameter (px)", tooltip=tooltip
    )


def sampler_fields(what="cells"):
    """Sampler steps and classifier-free guidance of generated cells."""
    from napari_cytodiffusion.core.model.sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS

    return (
        SpinBox(
            value=DEFAULT_STEPS,
            min=1,
            max=500,
            label="sampler steps",
            tooltip=f"More steps follow the model more exactly but take longer ({what}).",
        ),
        FloatSpinBox(
            value=DEFAULT_GUIDANCE,
            min=1.0,
            max=10.0,
            step=0.5,
            label="guidance",
            tooltip=f"Classifier-free guidance: 1 = none; higher follows the class more "
            f"strictly at some cost in variety ({what}).",
        ),
    )


MODEL_FILE = "model file…"
_MODEL_FIELDS = weakref.WeakSet()


def model_names(_=None):
    """The named models offered in every widget: ``default``, the registry's, local ones."""
    from napari_cytodiffusion.core.model.weights import WeightsError, list_models

    try:
        entries = list_models()
    except WeightsError:
        entries = []
    others = [entry.name for entry in entries if not entry.default]
    return ["default", *others, MODEL_FILE]


def refresh_model_choices():
    """Offer newly registered models (adapted, calibrated) in every open widget."""
    for fields in list(_MODEL_FIELDS):
        try:
            fields.model.reset_choices()
        except RuntimeError:  # its widget was closed and Qt has deleted it
            _MODEL_FIELDS.discard(fields)


class ModelFields:
    """The model, device and (optionally) seed fields, the same in every widget.

    ``none`` (a text, such as "none: a new model") is offered first where a run may use no
    model; ``label`` and ``tooltip`` name the model field for what the widget does with it.
    """

    def __init__(
        self,
        seed=True,
        seed_tooltip="Same seed, same result.",
        none=None,
        label="model",
        tooltip="default: the shipped model; the registry's models; models adapted or "
        "calibrated on this computer; or a model file (such as one made by Train model).",
    ):
        self.model = ComboBox(
            label=label,
            choices=model_names if none is None else lambda _=None: [none, *model_names()],
            value="default",
            tooltip=tooltip,
        )
        self.file = FileEdit(
            label="model file",
            mode="r",
            filter="*.pt *.ckpt",
            visible=False,
            tooltip="A model file (.pt), or a checkpoint (.ckpt) made by Train model.",
        )
        self.model.changed.connect(lambda value: setattr(self.file, "visible", value == MODEL_FILE))
        self.device = device_field()
        self.seed = SpinBox(label="seed", value=0, min=0, max=2**31 - 1, tooltip=seed_tooltip)
        self.widgets = [self.model, self.file, self.device] + ([self.seed] if seed else [])
        _MODEL_FIELDS.add(self)

    def choice(self):
        name = self.model.value or "default"
        if name == MODEL_FILE:
            name = str(self.file.value)
        return ModelChoice(name, self.device.value)

    def classes(self):
        """The chosen model's classes (the default model's while the field is not valid)."""
        from napari_cytodiffusion.core.model.weights import model_classes

        return model_classes(self.choice().name) or model_classes("default")

    def follow_classes(self, *combos):
        """Offer the chosen model's classes in each of ``combos`` (after the choices they
        start with that are not classes, such as auto), also when another model is chosen: an
        adapted model may have a class the default lacks, such as blast."""
        classes = self.classes()
        fixed = [[c for c in combo.choices if c not in classes] for combo in combos]

        def offer(*_):
            classes = self.classes()
            for combo, before in zip(combos, fixed, strict=True):
                value = combo.value
                combo.choices = (*before, *classes)
                if value in combo.choices:
                    combo.value = value

        self.model.changed.connect(offer)
        self.file.changed.connect(offer)


class DockForm(Container):
    """A dock widget whose fields scroll instead of stretching the window.

    Subclasses add their fields to ``self.form``. The dock keeps the form's minimum width;
    status lines wrap inside it (see :class:`StatusLabel`) and combo boxes elide long layer
    names, so no text widens the dock. (napari docks ``.native``, which for magicgui's own
    ``scrollable`` containers is the inner widget: the scroll area is built here instead.)
    """

    def __init__(self):
        super().__init__(labels=False)
        self.form = Container()
        self.form.native.layout().setAlignment(Qt.AlignTop)  # rows stay packed when docks grow
        self._scroll = _FormScrollArea(self._fit_labels)
        self._scroll.setFrameShape(QFrame.NoFrame)
        self._scroll.setWidget(self.form.native)
        self.native.layout().addWidget(self._scroll)
        self.native.layout().setContentsMargins(0, 0, 0, 0)

    def reset_choices(self, *_):
        self.form.reset_choices()

    def _fit_labels(self):
        """Give the label column the width of its widest label in the dock's own font.

        magicgui measures the labels' text in the application's default font and leaves out a
        label's margins; napari's stylesheet, applied when the dock is shown, sets a larger
        font, so in a narrow dock the widest label was clipped ("results folde")."""
        labels = [
            row._label_widget.native
            for row in (widget._labeled_widget() for widget in self.form)
            if row is not None
        ]
        width = max((label.sizeHint().width() for label in labels), default=0)
        for label in labels:
            label.setMinimumWidth(width)

    def add(self, *widgets):
        """Append widgets to the form, eliding long combo-box texts.

        Labelled magicgui fields share the label column; Qt widgets and unlabelled rows
        (button rows, status lines) span the whole width instead of being pushed right of it.
        A :class:`RunRow` gets the shortcuts: Ctrl+Return presses its first button, Escape
        its Cancel.
        """
        for widget in widgets:
            if isinstance(widget, RunRow):
                self.shortcut("Ctrl+Return", widget.buttons[0])
                self.shortcut("Escape", widget.cancel)
            if isinstance(widget, QWidget):
                self.form.native.layout().addWidget(widget)
            elif isinstance(widget, Container | Label) and not widget.label:
                self.form.native.layout().addWidget(widget.native)
            else:
                self.form.append(widget)
            if isinstance(widget, FileEdit):
                widget.choose_btn.text = "Browse…"  # not "Choose directory": narrower
                widget.choose_btn.tooltip = widget.tooltip
        for combo in self.form.native.findChildren(QComboBox):
            combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(8)

    def shortcut(self, keys, button):
        """Press ``button`` with ``keys`` (e.g. "Ctrl+Return") while focus is in this dock."""
        sequence = QKeySequence(keys)
        shortcut = QShortcut(sequence, self.native)
        shortcut.setContext(Qt.WidgetWithChildrenShortcut)
        shortcut.activated.connect(lambda: button.enabled and button.native.click())
        button.tooltip = f"{button.tooltip or button.text} ({sequence.toString()})"


# A dock may shrink to about two rows of its form (it scrolls), so that every widget of the
# plugin fits beside the canvas on a 1000-px-high screen.
MIN_FORM_HEIGHT = 60


class _FormScrollArea(QScrollArea):
    """Scrolls vertically; as wide as the form needs, never narrower."""

    def __init__(self, fit_labels):
        super().__init__()
        self.setWidgetResizable(True)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self._fit_labels = fit_labels

    def event(self, event):
        # Shown, the form has napari's font; a new font size in napari's settings changes it.
        if event.type() in (QEvent.Show, QEvent.FontChange, QEvent.StyleChange):
            self._fit_labels()
        return super().event(event)

    def minimumSizeHint(self):
        inner = self.widget().minimumSizeHint() if self.widget() else QSize(0, 0)
        return QSize(inner.width() + self.verticalScrollBar().sizeHint().width(), MIN_FORM_HEIGHT)

    def sizeHint(self):
        inner = self.widget().sizeHint() if self.widget() else QSize(0, 0)
        return QSize(self.minimumSizeHint().width(), inner.height())


class StatusLabel(Label):
    """A status line that wraps within its dock instead of widening it; its tooltip always
    holds the full text."""

    def __init__(self, value=""):
        super().__init__(value=value)
        self.native.setWordWrap(True)
        self.native.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)

    @property
    def value(self):
        return Label.value.fget(self)

    @value.setter
    def value(self, text):
        Label.value.fset(self, text)
        self.tooltip = text


class Banner(StatusLabel):
    """A warning about the result as a whole (the smear is unlike the training smears),
    set apart from the status line in amber, and hidden while there is nothing to say."""

    STYLE = "background-color: #f0b429; color: #1f1f1f; padding: 6px; border-radius: 4px;"

    def __init__(self):
        super().__init__()
        self.native.setStyleSheet(self.STYLE)
        self.visible = False

    def say(self, sentences):
        """Show ``sentences`` (each with a capital first letter, one per line); hide the
        banner when there are none."""
        lines = [s[:1].upper() + s[1:] for s in sentences if s]
        self.value = "\n".join(lines)
        self.visible = bool(lines)


class RunRow(Container):
    """Run buttons, a Cancel button and a status line, driven by one :class:`TaskRunner`.

    Buttons sit two to a row so a row never widens the dock; Cancel is wired here, once.
    """

    def __init__(self, description, *texts):
        self.buttons = [PushButton(text=text) for text in texts]
        self.cancel = PushButton(
            text="Cancel", tooltip="Stop the running work within a second; nothing is added."
        )
        self.status = StatusLabel()
        buttons = [*self.buttons, self.cancel]
        rows = [
            Container(widgets=buttons[i : i + 2], layout="horizontal", labels=False)
            for i in range(0, len(buttons), 2)
        ]
        for row in rows:
            row.margins = (0, 0, 0, 0)
        super().__init__(widgets=[*rows, self.status], labels=False)
        self.runner = TaskRunner(
            self.buttons[0] if len(self.buttons) == 1 else _Group(self.buttons),
            self.cancel,
            description,
            status=self.status,
        )


class _Group:
    """Several buttons enabled and disabled together."""

    def __init__(self, buttons):
        self._buttons = buttons

    @property
    def enabled(self):
        return all(button.enabled for button in self._buttons)

    @enabled.setter
    def enabled(self, value):
        for button in self._buttons:
            button.enabled = value
