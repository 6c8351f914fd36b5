"""One function per user action, shared by the command line, the widgets and scripts.

Each task takes plain values or a small request dataclass and returns a result dataclass with
everything a face needs to show or write; no face re-implements a step.
"""
