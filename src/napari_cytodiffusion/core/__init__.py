"""Qt-free core of napari-cytodiffusion: one function per user action, on plain values.

The tasks (what the command line, the widgets and scripts call):

=========================  =================================================================
``segment``                every white cell, red cell and platelet of a smear
``classify``               diffusion classification of the white cells, with uncertainty
``classify_cell_images``   the same for a folder of single-cell images
``explain``                counterfactual heat maps and edits of one cell
``explain_grid``           class x class mean heat maps over many cells
``generate``               synthetic cells of any class
``make_turing_panel``      a blinded real-versus-synthetic panel for experts
``score_turing_test``      an expert's answers scored against the key
``train_model``            train or fine-tune the model on labelled cells
``adapt_model``            adapt a model to a lab's few labelled cells, and calibrate it
``export_annotated``       a smear's reviewed cells as a labelled dataset
``analyze_smear``          segment, classify and triage one smear of any size
``analyze_files``          the same for many smears, on a dask cluster if asked
=========================  =================================================================

``load_model`` loads a registry model (sha256-checked) or a model file. Nothing here imports
napari or Qt; torch is imported inside the functions that need it. The names are imported
when first used, so that a face importing one building block (the command line's ``--help``,
a widget module) does not load them all. ``docs/architecture.md`` maps the building blocks
under ``smear/`` and ``model/``.
"""

import importlib

# Each public name and the module that defines it.
_EXPORTS = {
    "CLASSES": "classes",
    "load_model": "model.weights",
    "Segmented": "tasks.segment",
    "segment": "tasks.segment",
    "Classification": "tasks.classify",
    "classify": "tasks.classify",
    "classify_cell_images": "tasks.classify",
    "ExplainRequest": "tasks.explain",
    "Explanation": "tasks.explain",
    "ExplanationGrid": "tasks.explain",
    "explain": "tasks.explain",
    "explain_grid": "tasks.explain",
    "generate": "tasks.generate",
    "TuringRequest": "tasks.turing",
    "make_turing_panel": "tasks.turing",
    "score_turing_test": "tasks.turing",
    "TrainRequest": "tasks.train",
    "train_model": "tasks.train",
    "AdaptRequest": "tasks.adapt",
    "adapt_model": "tasks.adapt",
    "export_annotated": "tasks.annotate",
    "analyze_smear": "tasks.analyze",
    "BatchRequest": "tasks.analyze",
    "analyze_files": "tasks.analyze",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__():
    return sorted({*globals(), *__all__})
