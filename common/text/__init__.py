"""The text side of alignment: report preprocessing and the text tower."""

from fedmri.text.reports import normalize_whitespace, prepare_report, split_sections
from fedmri.text.tower import (
    MINILM,
    TextTower,
    build_text_tower,
    load_text_tower,
    resolve_text_model,
)

__all__ = [
    "MINILM",
    "TextTower",
    "build_text_tower",
    "load_text_tower",
    "normalize_whitespace",
    "prepare_report",
    "resolve_text_model",
    "split_sections",
]
