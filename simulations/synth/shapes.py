"""Signed-distance shapes and the canvas that paints tissues with them.

Shapes are evaluated on an (N, 3) float32 array of points in the phantom's
local millimetre frame, so a whole series grid is one vectorised call.
Occupancy is a partial-volume fraction in [0, 1] with a linear ramp across the
surface: sampled on a voxel grid it gives anti-aliased edges, not staircases.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Array = np.ndarray
Box = tuple[Sequence[float], Sequence[float]]


@dataclass(frozen=True)
class Shape:
    """A solid: signed distance (mm, negative inside) and a bounding box (None = unbounded)."""

    sdf: Callable[[Array], Array]
    box: Box | None = None

    def grown(self, mm: float) -> Shape:
        """The shape dilated (mm > 0) or eroded (mm < 0) by ``mm``: a cortex, a cartilage layer."""
        box = None if self.box is None else (np.subtract(self.box[0], max(mm, 0.0)), np.add(self.box[1], max(mm, 0.0)))
        return Shape(lambda p: self.sdf(p) - mm, box)


def ellipsoid(centre: Sequence[float], radii: Sequence[float]) -> Shape:
    """Axis-aligned ellipsoid (approximate distance: the normalised radius times the smallest semi-axis)."""
    c, r = np.asarray(centre, np.float32), np.asarray(radii, np.float32)

    def sdf(p: Array) -> Array:
        q = (p - c) / r  # N, 3
        return (np.sqrt(np.einsum("ij,ij->i", q, q)) - 1.0) * r.min()

    return Shape(sdf, (c - r, c + r))


def cylinder(centre_xy: Sequence[float], radii_xy: Sequence[float], z_range: Sequence[float],
             y_shift: Callable[[Array], Array] | None = None, y_extent: float = 0.0) -> Shape:
    """z-aligned elliptic cylinder between two caps.

    Args:
        centre_xy: (x, y) of the axis.
        radii_xy: semi-axes in x and y.
        z_range: (z_min, z_max).
        y_shift: optional z -> y offset of the axis (a curved axis, e.g. lordosis).
        y_extent: bound of ``|y_shift|`` for the bounding box.
    """
    (cx, cy), (rx, ry) = centre_xy, radii_xy
    z0, z1 = z_range
    rmin = np.float32(min(rx, ry))

    def sdf(p: Array) -> Array:
        y = p[:, 1] - cy if y_shift is None else p[:, 1] - cy - y_shift(p[:, 2])
        dx, dy = (p[:, 0] - cx) / rx, y / ry
        radial = (np.sqrt(dx * dx + dy * dy) - 1.0) * rmin
        axial = np.abs(p[:, 2] - 0.5 * (z0 + z1)) - 0.5 * (z1 - z0)
        return np.maximum(radial, axial)

    box = ((cx - rx, cy - ry - y_extent, z0), (cx + rx, cy + ry + y_extent, z1))
    return Shape(sdf, box)


def capsule(a: Sequence[float], b: Sequence[float], radius: float) -> Shape:
    """Segment a-b swept by a sphere (tendons)."""
    a_, b_ = np.asarray(a, np.float32), np.asarray(b, np.float32)
    ab = b_ - a_

    def sdf(p: Array) -> Array:
        d = p - a_  # N, 3
        t = np.clip((d[:, 0] * ab[0] + d[:, 1] * ab[1] + d[:, 2] * ab[2]) / float(ab @ ab), 0.0, 1.0)  # N
        return np.linalg.norm(p - (a_ + t[:, None] * ab), axis=1) - radius

    return Shape(sdf, (np.minimum(a_, b_) - radius, np.maximum(a_, b_) + radius))


def box(centre: Sequence[float], half: Sequence[float]) -> Shape:
    """Axis-aligned box with half-sizes ``half``."""
    c, h = np.asarray(centre, np.float32), np.asarray(half, np.float32)

    def sdf(p: Array) -> Array:
        q = np.abs(p - c) - h  # N, 3
        return np.linalg.norm(np.maximum(q, 0.0), axis=1) + np.minimum(q.max(axis=1), 0.0)

    return Shape(sdf, (c - h, c + h))


def union(*shapes: Shape) -> Shape:
    """Union of shapes (minimum of their distances)."""
    def sdf(p: Array) -> Array:
        return np.minimum.reduce([s.sdf(p) for s in shapes])

    boxes = [s.box for s in shapes]
    if any(b is None for b in boxes):
        return Shape(sdf, None)
    return Shape(sdf, (np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)))


def intersect(a: Shape, b: Shape) -> Shape:
    """Intersection of two shapes (maximum of distances); bounded by ``a``'s box."""
    return Shape(lambda p: np.maximum(a.sdf(p), b.sdf(p)), a.box if a.box is not None else b.box)


def inside_ellipse(pts: Array, centre_xy: Sequence[float], radii_xy: Sequence[float], margin: float = 2.0) -> Array:
    """(N,) bool: points within ``margin`` mm of a z-aligned elliptic cylinder (a body outline)."""
    dx = (pts[:, 0] - centre_xy[0]) / (radii_xy[0] + margin)
    dy = (pts[:, 1] - centre_xy[1]) / (radii_xy[1] + margin)
    return dx * dx + dy * dy <= 1.0


def occupancy(sdf: Array, soft: float = 1.0) -> Array:
    """Partial-volume fraction from a signed distance: 1 inside, 0 outside, linear ramp across."""
    return np.clip(0.5 - sdf / soft, 0.0, 1.0).astype(np.float32)


class Canvas:
    """Tissue fractions at a set of points, painted structure by structure.

    Painting composites a structure over what is there ("over" operator), so
    later structures win and partial-volume edges blend. A shape's distance is
    evaluated only on the points inside its bounding box, which keeps small
    structures cheap on big grids.

    Args:
        pts: (N, 3) local points.
        tissues: names of every tissue that may be painted.
    """

    def __init__(self, pts: Array, tissues: Sequence[str]) -> None:
        self.pts = pts
        self._cols: list[Array] | None = None
        self.names = list(tissues)
        self.row = {name: i for i, name in enumerate(self.names)}
        self.f = np.zeros((len(self.names), len(pts)), dtype=np.float32)  # T, N
        self.active: list[int] = []  # rows painted so far; the others are all zero

    def paint(self, tissue: str, shape: Shape, within: Mapping[str, float] | None = None,
              soft: float = 1.0, weight: Array | None = None) -> None:
        """Composite ``tissue`` where ``shape`` lies.

        Args:
            tissue: the tissue the structure is made of.
            shape: where it is.
            within: if given, only these tissues are replaced, each scaled by its
                weight in [0, 1] (oedema replaces white matter only); air stays.
            soft: width (mm) of the partial-volume ramp across the surface.
            weight: optional (N,) factor on the occupancy (e.g. "distal part only").
        """
        if shape.box is None:
            sel = np.arange(len(self.pts))
        else:
            if self._cols is None:  # contiguous columns make bounding-box tests fast
                self._cols = [np.ascontiguousarray(self.pts[:, i]) for i in range(3)]
            inside = np.ones(len(self.pts), dtype=bool)
            for col, lo, hi in zip(self._cols, shape.box[0], shape.box[1], strict=True):
                inside &= (col >= lo - soft) & (col <= hi + soft)
            sel = np.flatnonzero(inside)
        occ = occupancy(shape.sdf(self.pts[sel]), soft)  # M
        if weight is not None:
            occ *= weight[sel]
        hit = occ > 0
        sel, occ = sel[hit], occ[hit]
        if len(sel) == 0:
            return
        t = self.row[tissue]
        if t not in self.active:
            self.active.append(t)
        rows = np.array(self.active)
        block = self.f[np.ix_(rows, sel)]  # A, M
        if within is None:
            block *= 1.0 - occ
            block[self.active.index(t)] += occ
        else:
            w = np.array([within.get(self.names[r], 0.0) for r in rows], dtype=np.float32)
            taken = block * (occ * w[:, None])  # A, M
            block -= taken
            block[self.active.index(t)] += taken.sum(axis=0)
        self.f[np.ix_(rows, sel)] = block

    def add(self, tissue: str, values: Array) -> None:
        """Add (N,) fractions of ``tissue`` directly (maps sampled from an atlas)."""
        t = self.row[tissue]
        if t not in self.active:
            self.active.append(t)
        self.f[t] += values

    def fractions(self) -> dict[str, Array]:
        """Tissue name -> (N,) fraction, for the tissues present anywhere."""
        return {self.names[i]: self.f[i] for i in self.active}
