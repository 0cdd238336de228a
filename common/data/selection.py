"""Which volumes of a hospital export are worth indexing (``data.index`` settings).

A PACS export holds more than the diagnostic volumes a model should see:
localizers, reformats and projections computed from other series, phase
images beside their magnitude, single slices, and long time series. Each rule
here turns such a volume into a reason the site admin reads in the skipped
list, naming the setting that would keep it. Rules look at header fields
only (ImageType, descriptions, counts), so nothing is decoded to be dropped.

Defaults (``fedmri.config.schema.IndexConfig``): localizers, derived
reformats/projections and phase images with a magnitude partner are skipped;
volumes need 5 slices; a series yields at most 16 volumes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedmri.config.schema import IndexConfig
from fedmri.errors import ConfigError

__all__ = ["Candidate", "SelectionSettings", "derived_reason", "localizer_reason", "select_volumes"]

# ImageType values of images computed from another series rather than acquired.
_DERIVED_MARKERS = ("PROJECTION IMAGE", "MPR", "CSA MPR", "MIP", "MNIP", "MINIP", "MIN IP", "MAX IP", "MAXIP",
                    "REFORMATTED", "REFORMAT", "CURVED", "CPR", "VOLUME RENDERING", "VRT", "SCREEN SHOT",
                    "SCREENSHOT", "SCREEN SAVE", "SECONDARY CAPTURE")
_LOCALIZER_TEXT = re.compile(r"scout|locali[sz]er|survey|tri-?pilot|3[\s_-]*pl(ane)?[\s_-]*loc|(?<![a-z])loc(?![a-z])")
_PHASE = frozenset({"P", "FM"})


@dataclass(frozen=True)
class SelectionSettings:
    """Validated copy of ``data.index``; defaults and why each rule exists: :class:`fedmri.config.schema.IndexConfig`.

    Raises:
        ConfigError: ``min_slices`` below 1 or ``max_volumes_per_series`` below 0.
    """

    skip_localizers: bool = IndexConfig.skip_localizers
    skip_derived: bool = IndexConfig.skip_derived
    skip_phase: bool = IndexConfig.skip_phase
    min_slices: int = IndexConfig.min_slices
    max_volumes_per_series: int = IndexConfig.max_volumes_per_series

    def __post_init__(self) -> None:
        if int(self.min_slices) < 1:
            raise ConfigError(f"data.index.min_slices={self.min_slices} must be at least 1")
        if int(self.max_volumes_per_series) < 0:
            raise ConfigError(f"data.index.max_volumes_per_series={self.max_volumes_per_series} must be >= 0 "
                              "(0 keeps every volume)")

    @classmethod
    def from_config(cls, index: Any) -> SelectionSettings:
        """From ``cfg.data.index`` (a DictConfig or ``IndexConfig``)."""
        return cls(skip_localizers=bool(index.skip_localizers), skip_derived=bool(index.skip_derived),
                   skip_phase=bool(index.skip_phase), min_slices=int(index.min_slices),
                   max_volumes_per_series=int(index.max_volumes_per_series))

    @classmethod
    def keep_all(cls) -> SelectionSettings:
        """No rule at all: every volume that the files hold is kept."""
        return cls(skip_localizers=False, skip_derived=False, skip_phase=False, min_slices=1,
                   max_volumes_per_series=0)


@dataclass
class Candidate:
    """One volume of one series, as the headers describe it.

    Attributes:
        key: catalog key (:func:`fedmri.data.dicom_split.series_key`).
        paths: its files.
        n_slices: images in it (files, frames or mosaic tiles); None when unknown.
        component: "M", "P", "R", "I", "FM" or None (not marked).
        image_type: ImageType values of its files.
    """

    key: str
    series_uid: str
    study_uid: str
    paths: list[str]
    n_slices: int | None
    component: str | None = None
    image_type: list[str] = field(default_factory=list)
    description: str = ""
    protocol: str = ""


def localizer_reason(image_type: Sequence[str], description: str, protocol: str) -> str | None:
    """Why a volume is a localizer/scout, or None: ImageType LOCALIZER, or its description."""
    if any(str(v).strip().upper() == "LOCALIZER" for v in image_type):
        return "localizer/scout (ImageType LOCALIZER)"
    for text in (description, protocol):
        if text and _LOCALIZER_TEXT.search(text.lower()):
            return f"localizer/scout (description {text!r})"
    return None


def derived_reason(image_type: Sequence[str]) -> str | None:
    """Why a volume is a reformat, projection or screen capture of other images, or None."""
    values = [str(v).strip().upper() for v in image_type]
    if not any(v in _DERIVED_MARKERS for v in values):
        return None
    return f"reformat, projection or screen capture computed from another series (ImageType {_joined(values)})"


def _joined(values: Sequence[str]) -> str:
    return "\\".join(values)


def select_volumes(candidates: Sequence[Candidate], settings: SelectionSettings
                   ) -> tuple[list[Candidate], list[tuple[Candidate, str]]]:
    """Apply the rules to every volume of an export.

    Args:
        candidates: all volumes, series after series, each series' volumes in
            key order (the order the volume cap keeps).
        settings: the rules.

    Returns:
        ``(kept, skipped)``: the volumes to index, and the others each with its reason.
    """
    skipped: list[tuple[Candidate, str]] = []
    kept: list[Candidate] = []
    for volume in candidates:
        reason = _rule_reason(volume, settings)
        if reason is not None:
            skipped.append((volume, reason))
        else:
            kept.append(volume)
    if settings.skip_phase:
        kept = _drop_phase(kept, candidates, skipped)
    return _cap(kept, settings, skipped), skipped


def _rule_reason(volume: Candidate, settings: SelectionSettings) -> str | None:
    if settings.skip_localizers:
        reason = localizer_reason(volume.image_type, volume.description, volume.protocol)
        if reason:
            return f"{reason}: planning images, not a diagnostic volume (data.index.skip_localizers=false keeps them)"
    if settings.skip_derived:
        reason = derived_reason(volume.image_type)
        if reason:
            return f"{reason}: the acquired series holds the same data (data.index.skip_derived=false keeps them)"
    if volume.n_slices is not None and volume.n_slices < settings.min_slices:
        return (f"{volume.n_slices} slice(s), fewer than data.index.min_slices={settings.min_slices}: "
                "too thin for a 3D volume")
    return None


def _drop_phase(kept: list[Candidate], candidates: Sequence[Candidate],
                skipped: list[tuple[Candidate, str]]) -> list[Candidate]:
    """Phase / field-map volumes go when a magnitude of the same series, or study and protocol, exists."""
    magnitude = [c for c in candidates if c.component not in _PHASE]
    by_series = {c.series_uid for c in magnitude}
    by_protocol: Mapping[tuple[str, str], str] = {(c.study_uid, c.protocol): c.key for c in magnitude if c.protocol}
    out = []
    for volume in kept:
        if volume.component in _PHASE:
            what = "field map" if volume.component == "FM" else "phase image"
            if volume.series_uid in by_series:
                skipped.append((volume, f"{what} beside the magnitude image of the same series "
                                        "(data.index.skip_phase=false keeps it)"))
                continue
            partner = by_protocol.get((volume.study_uid, volume.protocol))
            if partner is not None:
                skipped.append((volume, f"{what} of protocol {volume.protocol!r}, whose magnitude image is series "
                                        f"{partner} (data.index.skip_phase=false keeps it)"))
                continue
        out.append(volume)
    return out


def _cap(kept: list[Candidate], settings: SelectionSettings, skipped: list[tuple[Candidate, str]]
         ) -> list[Candidate]:
    limit = settings.max_volumes_per_series
    if not limit:
        return kept
    per_series: dict[str, list[Candidate]] = {}
    for volume in kept:
        per_series.setdefault(volume.series_uid, []).append(volume)
    out = []
    for volumes in per_series.values():
        out += volumes[:limit]
        if len(volumes) > limit:  # one entry for the rest: an fMRI run would otherwise list hundreds
            rest = volumes[limit:]
            merged = Candidate(key=f"{rest[0].key} ... {rest[-1].key}" if len(rest) > 1 else rest[0].key,
                               series_uid=rest[0].series_uid, study_uid=rest[0].study_uid,
                               paths=sorted({p for v in rest for p in v.paths}), n_slices=None)
            skipped.append((merged, f"series holds {len(volumes)} volumes (echoes, b-values, directions or time "
                                    f"points); only the first {limit} are indexed, {len(rest)} are not "
                                    "(data.index.max_volumes_per_series; 0 keeps all)"))
    return out
