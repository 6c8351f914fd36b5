"""Qt-free core of napari-cytodiffusion: one function per user action, on plain values.

The tasks (what the command line, the widgets and scripts call):

========================  ==================================================================
``segment``               every white cell, red cell and platelet of a smear
``classify``              diffusion classification of the white cells, with uncertainty
``explain``               counterfactual heat maps and edits of one cell
``explain_grid``          class x class mean heat maps over many cells
``generate``              synthetic cells of any class
``make_turing_panel``     a blinded real-versus-synthetic panel for experts
``score_turing_test``     an expert's answers scored against the key
``train_model``           train or adapt the model on a lab's labelled cells
========================  ==================================================================

``load_model`` loads a registry model (sha256-checked) or a model file. Nothing here imports
napari or Qt; torch is imported inside the functions that need it. ``docs/architecture.md``
maps the building blocks under ``smear/`` and ``model/``.
"""

from napari_cytodiffusion.core.classes import CLASSES
from napari_cytodiffusion.core.model.weights import load_model
from napari_cytodiffusion.core.tasks.classify import Classification, classify
from napari_cytodiffusion.core.tasks.explain import (
    ExplainRequest,
    Explanation,
    ExplanationGrid,
    explain,
    explain_grid,
)
from napari_cytodiffusion.core.tasks.generate import generate
from napari_cytodiffusion.core.tasks.segment import Segmented, segment
from napari_cytodiffusion.core.tasks.train import TrainRequest, train_model
from napari_cytodiffusion.core.tasks.turing import (
    TuringRequest,
    make_turing_panel,
    score_turing_test,
)

__all__ = [
    "CLASSES",
    "Classification",
    "ExplainRequest",
    "Explanation",
    "ExplanationGrid",
    "Segmented",
    "TrainRequest",
    "TuringRequest",
    "classify",
    "explain",
    "explain_grid",
    "generate",
    "load_model",
    "make_turing_panel",
    "score_turing_test",
    "segment",
    "train_model",
]
