"""Cell class names: the shipped model's classes, and matching names written other ways.

A loaded model carries its own ``classes``; everything that depends on them takes them from
the model. ``CLASSES`` is the standard set, used only where no model exists yet (training a
new model from scratch, or help texts).
"""

CLASSES = (
    "basophil",
    "eosinophil",
    "erythroblast",
    "immature_granulocyte",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "platelet",
)

# Cells a white-cell differential counts but leaves out of its 100: nucleated red cells are
# reported per 100 leukocytes, as haematology reports them; a platelet (or clump) the
# segmentation took for a cell is not a white cell at all; smudge cells (a class a lab can
# add when adapting, see docs/annotation.md) are broken cells, reported apart.
OUTSIDE_DIFFERENTIAL = ("erythroblast", "platelet", "smudge_cell")

# Folder names in datasets that differ from ours (PBC files immature granulocytes under `ig`).
CLASS_ALIASES = {"ig": "immature_granulocyte"}


def class_key(name):
    """``name`` written as class names are: lower case, words joined by "_", aliases resolved.

    Examples
    --------
    >>> class_key(" Smudge cell")
    'smudge_cell'
    >>> class_key("IG")
    'immature_granulocyte'
    """
    key = "_".join(str(name).strip().lower().split())
    return CLASS_ALIASES.get(key, key)


def canonical_class(name, classes=CLASSES):
    """Return the name in ``classes`` that ``name`` means (case-insensitive, aliases resolved).

    Examples
    --------
    >>> canonical_class("IG")
    'immature_granulocyte'
    >>> canonical_class("blast", ("blast", "neutrophil"))
    'blast'

    Raises
    ------
    ValueError
        If ``name`` is not one of ``classes`` or an alias of one.
    """
    key = class_key(name)
    if key not in classes:
        raise ValueError(f"Unknown cell class {name!r}; expected one of: {', '.join(classes)}.")
    return key
