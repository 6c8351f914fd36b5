"""The cell classes the model knows, with the exact names used everywhere."""

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

# Folder names in datasets that differ from ours (PBC files immature granulocytes under `ig`).
CLASS_ALIASES = {"ig": "immature_granulocyte"}


def canonical_class(name):
    """Return the canonical class name for ``name`` (case-insensitive, aliases resolved).

    Raises
    ------
    ValueError
        If ``name`` is not a known class or alias.
    """
    key = str(name).strip().lower()
    key = CLASS_ALIASES.get(key, key)
    if key not in CLASSES:
        raise ValueError(f"Unknown cell class {name!r}; expected one of: {', '.join(CLASSES)}.")
    return key
