"""The docks fit a 1600 x 1000 screen: every widget open at once leaves the canvas most of the
window, long status text wraps instead of widening a dock, forms scroll, every control has a
tooltip, and the main action of each widget has a keyboard shortcut."""

import pytest
from qtpy.QtWidgets import QAbstractButton, QAbstractSpinBox, QComboBox, QLineEdit, QWidget

from napari_cytodiffusion._widgets._adapt import AdaptWidget
from napari_cytodiffusion._widgets._analyze import AnalyzeWidget
from napari_cytodiffusion._widgets._annotate import AnnotateWidget
from napari_cytodiffusion._widgets._cell_images import CellImagesWidget
from napari_cytodiffusion._widgets._classify import TABLE_ROWS, ClassifyWidget, show_differential
from napari_cytodiffusion._widgets._counterfactual import CounterfactualWidget
from napari_cytodiffusion._widgets._generate import GenerateWidget
from napari_cytodiffusion._widgets._segment import SegmentWidget
from napari_cytodiffusion._widgets._train import TrainWidget
from napari_cytodiffusion._widgets._turing import TuringWidget

WIDGETS = (
    SegmentWidget,
    ClassifyWidget,
    CounterfactualWidget,
    GenerateWidget,
    TuringWidget,
    TrainWidget,
    AnalyzeWidget,
    AnnotateWidget,
    AdaptWidget,
    CellImagesWidget,
)
SCREEN = (1600, 1000)


def _untipped_controls(widget):
    """Inputs and buttons of a dock widget with no tooltip on them or on their field."""
    missing = []
    for control in widget.native.findChildren(QWidget):
        if not isinstance(control, QAbstractButton | QAbstractSpinBox | QComboBox | QLineEdit):
            continue
        field = control
        while field is not None and field is not widget.native and not field.toolTip():
            field = field.parentWidget()
        if field is None or field is widget.native:
            missing.append(control.text() if hasattr(control, "text") else type(control).__name__)
    return missing


@pytest.fixture
def docked(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(*SCREEN)
    widgets = [cls(viewer) for cls in WIDGETS]
    for widget in widgets:
        viewer.window.add_dock_widget(widget, name=type(widget).__name__)
    return viewer, widgets


def test_all_widgets_open_leave_the_canvas_most_of_the_window(docked, qtbot):
    viewer, widgets = docked
    canvas = viewer.window._qt_viewer.canvas.native
    long_text = "failed: " + "a very long reason that would widen the dock " * 12
    before = [widget.native.parentWidget().width() for widget in widgets]
    for widget in widgets:
        if hasattr(widget, "_runner"):
            widget._runner._status.value = long_text
    qtbot.wait(200)
    window = viewer.window._qt_window
    assert window.height() <= SCREEN[1] and window.width() <= SCREEN[0]
    assert canvas.width() >= 900
    assert [widget.native.parentWidget().width() for widget in widgets] == before
    assert widgets[0]._runner._status.tooltip == long_text  # the full text, on hover
    table = widgets[1]._summary  # the differential shows every class without scrolling
    assert table.minimumHeight() >= TABLE_ROWS * table.verticalHeader().defaultSectionSize()


def test_the_differential_shows_its_three_columns_in_the_docks_width(docked, qtbot):
    from napari_cytodiffusion.core.tasks.classify import differential_count

    viewer, widgets = docked
    classes = widgets[1]._fields.classes()
    counts = differential_count([*classes, "immature_granulocyte"] * 120, classes)
    for widget in (widgets[1], widgets[-1]):  # Classify cells, Classify cell images
        table = widget._summary
        show_differential(table, counts)
        qtbot.wait(50)
        assert not table.horizontalScrollBar().isVisible()
        assert table.horizontalHeader().length() <= table.viewport().width()
        for column in (1, 2):  # counts and per cents are never cut
            widest = max(
                table.fontMetrics().horizontalAdvance(table.item(r, column).text())
                for r in range(table.rowCount())
            )
            assert table.columnWidth(column) >= widest
        platelet = next(r for r in range(table.rowCount()) if "platelet" in table.item(r, 0).text())
        assert table.item(platelet, 0).text() == "platelet *"  # counted per 100, not among them


def test_no_field_label_is_clipped(docked, qtbot):
    """Every field's label shows whole in napari's font, also in the narrowest dock (Analyze
    smear's "results folder" read "results folde")."""
    from magicgui.widgets import Container

    _, widgets = docked
    qtbot.wait(50)
    clipped = [
        (type(widget).__name__, field.label)
        for widget in widgets
        for field in widget.form
        if not isinstance(field, Container)
        and field._labeled_widget() is not None
        and field.visible
        and (label := field._labeled_widget()._label_widget.native).width()
        < label.sizeHint().width()
    ]
    assert not clipped


def test_every_control_has_a_tooltip_and_the_main_action_a_shortcut(docked):
    _, widgets = docked
    for widget in widgets:
        missing = _untipped_controls(widget)
        assert not missing, f"{type(widget).__name__}: {missing}"
        if isinstance(widget, AnnotateWidget):
            continue  # no long work: its actions have keys on the layer (1-9, N, U)
        run = widget._runner._run_button
        buttons = getattr(run, "_buttons", [run])
        assert "Ctrl+Return" in buttons[0].tooltip


def test_ctrl_return_in_the_dock_presses_the_main_button(make_napari_viewer, qtbot, monkeypatch):
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QApplication

    from napari_cytodiffusion._widgets import _segment

    errors = []
    monkeypatch.setattr(_segment, "show_error", errors.append)
    viewer = make_napari_viewer(show=True)
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    QApplication.setActiveWindow(viewer.window._qt_window)  # no window manager under Xvfb
    field = widget._diameter.native
    field.setFocus()
    qtbot.wait(100)
    qtbot.keyClick(field, Qt.Key_Return, Qt.ControlModifier)
    assert errors and "Open a blood-smear image" in errors[-1]  # Segment was pressed
