"""What every synthetic body region provides: tissues and lesions at any point.

An anatomy is one patient's body region in its own millimetre frame (MNI
space for the brain, a knee- or spine-centred frame for the phantoms), placed
in the scanner by a :class:`Pose`. Rendering a series asks it for tissue and
lesion fractions at the series' voxel positions; nothing is rasterised in
advance, so every series is sampled at its own resolution and angulation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmri.simulations.synth.grid import transform, voxel_points
from fedmri.simulations.synth.tissues import TISSUES, Tissue

# Finding codes of labels.csv, and their values in the ground-truth mask files.
FINDING_CODES = ("mass", "wmh", "infarct", "effusion", "disc_herniation")
MASK_LABELS = {code: i + 1 for i, code in enumerate(FINDING_CODES)}


@dataclass(frozen=True)
class Finding:
    """One abnormality with its ground truth.

    Attributes:
        code: one of :data:`FINDING_CODES`.
        location: radiology wording of where it is ("left frontal lobe", "L4-L5").
        size_mm: largest dimensions in mm (for the report), or None.
        attrs: shape parameters the anatomy needs (centre, radii, ...) and
            descriptors the report uses (grade, side, enhancing, ...).
    """

    code: str
    location: str
    size_mm: tuple[float, ...] | None = None
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pose:
    """Local frame -> scanner RAS: ``world = offset + rotation @ (scale * local)``."""

    rotation: np.ndarray
    offset: np.ndarray
    scale: float

    def to_local(self, pts: np.ndarray) -> np.ndarray:
        """(N, 3) RAS mm -> (N, 3) local mm."""
        m = self.local_from_world()
        return transform(pts, m[:3, :3], m[:3, 3])

    def local_from_world(self) -> np.ndarray:
        """4x4 RAS mm -> local mm."""
        m = np.eye(4)
        m[:3, :3] = self.rotation.T / self.scale
        m[:3, 3] = -m[:3, :3] @ self.offset
        return m

    def to_world(self, local: np.ndarray) -> np.ndarray:
        """(3,) or (N, 3) local mm -> RAS mm."""
        return self.offset + (np.asarray(local, dtype=np.float64) * self.scale) @ self.rotation.T


def random_pose(rng: np.random.Generator, scale: float, max_deg: float, shift_mm: float,
                mirror_x: bool = False) -> Pose:
    """A patient's placement in the scanner: small rotations and shifts about isocentre."""
    angles = np.radians(rng.uniform(-max_deg, max_deg, size=3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rot = rz @ ry @ rx
    if mirror_x:  # a left knee is the mirror image of a right one
        rot = rot @ np.diag([-1.0, 1.0, 1.0])
    return Pose(rotation=rot, offset=rng.uniform(-shift_mm, shift_mm, size=3), scale=scale)


class Anatomy(ABC):
    """One patient's body region: tissue and lesion fractions at any point.

    Subclasses set ``region``, ``pose``, ``findings`` and implement
    :meth:`local_fractions` and :attr:`centre_local`.
    """

    region: str
    pose: Pose
    findings: tuple[Finding, ...]

    @property
    @abstractmethod
    def centre_local(self) -> np.ndarray:
        """(3,) local mm point that a field of view is centred on."""

    @abstractmethod
    def local_fractions(self, pts: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Tissue and lesion fractions at (N, 3) local points.

        Returns:
            ``(tissues, lesions)``: tissue name -> (N,) fraction (summing to at
            most 1; the rest is air) and finding code -> (N,) occupancy.
        """

    def tissues(self) -> dict[str, Tissue]:
        """Tissue properties for this patient (override for age effects)."""
        return dict(TISSUES)

    @property
    def centre_world(self) -> np.ndarray:
        """RAS mm of the region's centre in the scanner."""
        return self.pose.to_world(self.centre_local)

    def support(self, pts: np.ndarray) -> np.ndarray | None:
        """(N,) bool: points that may hold tissue (the rest is air), or None for "all".

        Rendering evaluates the anatomy only there: a field of view is often
        more than half air.
        """
        return None

    def sample_grid(self, affine: np.ndarray, shape: tuple[int, int, int],
                    n_sub: int = 1) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Fractions on a series grid, averaged over ``n_sub`` samples through each slice.

        Args:
            affine: voxel -> RAS affine of the series.
            shape: (I, J, K).
            n_sub: sub-samples per voxel along k (partial volume of thick slices).

        Returns:
            Same as :meth:`local_fractions`, arrays of I*J*K values in C order.
        """
        return self.sample(voxel_points(affine, shape, n_sub))

    def sample(self, pts: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Fractions averaged over sub-samples.

        Args:
            pts: (S, N, 3) RAS points, S sub-samples per voxel.

        Returns:
            Same as :meth:`local_fractions`, averaged over S.
        """
        n = pts.shape[1]
        tissues: dict[str, np.ndarray] = {}
        lesions: dict[str, np.ndarray] = {}
        w = np.float32(1.0 / len(pts))
        for sub in pts:
            local = self.pose.to_local(sub)
            keep = self.support(local)
            sel = None if keep is None else np.flatnonzero(keep)
            t, les = self.local_fractions(local if sel is None else local[sel])
            for acc, new in ((tissues, t), (lesions, les)):
                for name, frac in new.items():
                    if name not in acc:
                        acc[name] = np.zeros(n, dtype=np.float32)
                    if sel is None:
                        acc[name] += frac * w
                    else:
                        acc[name][sel] += frac * w
        return tissues, lesions
