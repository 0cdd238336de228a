"""From anatomy and acquisition to a series' pixel array and its lesion mask.

The imaging chain, in the order a scanner applies it: tissue fractions at the
voxel positions (partial volume through the slice), signal equations, a smooth
multiplicative receive-coil bias field, complex Gaussian noise taken in
magnitude (Rician), then the vendor's arbitrary intensity scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmri.simulations.synth.anatomy import MASK_LABELS, Anatomy
from fedmri.simulations.synth.contrast import Acquisition, adc_map, signal

# Voxel volume (mm^3) at which a series has the site's nominal SNR.
_REF_VOXEL_MM3 = 16.0
# Relative contrast of a lesion's core against the tissue around it, noise-free, at
# which the lesion shows on a series and enters its mask (:func:`shows`).
VISIBLE_CONTRAST = 0.15


@dataclass(frozen=True)
class Chain:
    """Scanner-side image degradations of one series.

    Attributes:
        field_strength: B0 (T); sets T1 values and scales SNR.
        snr: signal (99th percentile) over noise sigma at 1.5 T and a 16 mm^3 voxel.
        bias: standard deviation of the log bias-field coefficients (0 = flat).
        level: the vendor's stored intensity for bright tissue (99th percentile).
    """

    field_strength: float
    snr: float
    bias: float
    level: float


def bias_field(affine: np.ndarray, shape: tuple[int, int, int], strength: float,
               rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field: exp of a random quadratic in position (per 100 mm).

    Args:
        affine: voxel -> RAS affine of the series.
        shape: (I, J, K).
        strength: spread of the coefficients; 0.15 gives roughly +-20% over a head.
        rng: random source.

    Returns:
        float32 (I*J*K,) gains in C order.
    """
    idx = [np.arange(n, dtype=np.float32) - (n - 1) / 2.0 for n in shape]
    ii, jj, kk = idx[0][:, None, None], idx[1][None, :, None], idx[2][None, None, :]
    a = affine[:3, :3].astype(np.float32) / np.float32(100.0)
    x, y, z = (a[r, 0] * ii + a[r, 1] * jj + a[r, 2] * kk for r in range(3))  # offsets from the FOV centre
    basis = (x, y, z, x * y, y * z, x * z, x * x - y * y, z * z)
    coef = rng.normal(0.0, strength, size=len(basis)).astype(np.float32)
    log_b = sum(c * b for c, b in zip(coef, basis, strict=True))
    return np.exp(np.broadcast_to(log_b, tuple(shape))).astype(np.float32).reshape(-1)


def rician(clean: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of signal plus complex Gaussian noise of std ``sigma`` per channel."""
    re = clean + rng.normal(0.0, sigma, size=clean.shape).astype(np.float32)
    im = rng.normal(0.0, sigma, size=clean.shape).astype(np.float32)
    return np.sqrt(re * re + im * im)


def render_series(anatomy: Anatomy, acq: Acquisition, affine: np.ndarray, shape: tuple[int, int, int],
                  chain: Chain, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Simulate one series.

    Args:
        anatomy: the patient's body region.
        acq: acquisition parameters (family, TR/TE/TI, b, fat saturation, contrast).
        affine: voxel -> RAS affine of the series grid.
        shape: (I, J, K).
        chain: field strength, SNR, bias and vendor level.
        rng: random source for bias and noise.

    Returns:
        ``(image, mask)``: float32 (I, J, K) stored values (ADC in 1e-6 mm^2/s)
        and uint8 (I, J, K) lesion labels (:data:`MASK_LABELS`, 0 = none).
    """
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    # Two samples through a thick slice give most of its partial volume at 2/3 the cost of three.
    n_sub = int(np.clip(round(spacing[2] / min(spacing[0], spacing[1])), 1, 2))
    fractions, lesions = anatomy.sample_grid(affine, shape, n_sub)
    tissues = anatomy.tissues()
    b = float(acq.b or 0.0)
    field = chain.field_strength
    voxel = float(np.prod(spacing))
    snr = chain.snr * (field / 1.5) ** 0.8 * np.sqrt(voxel / _REF_VOXEL_MM3)
    gain = bias_field(affine, shape, chain.bias, rng)  # N

    if acq.family == "ADC":
        s0 = signal(fractions, tissues, acq, field) * gain  # N
        sb = signal(fractions, tissues, acq, field, b=b) * gain  # N
        sigma = float(np.percentile(s0, 99)) / snr
        s0n, sbn = rician(s0, sigma, rng), rician(sb, sigma, rng)
        image = adc_map(s0n, sbn, b, floor=6.0 * sigma)
        clean = adc_map(s0, sb, b, floor=6.0 * sigma)  # what the lesion's visibility is judged on
    else:
        clean = signal(fractions, tissues, acq, field, b=b) * gain  # N
        ref = float(np.percentile(clean, 99)) or 1.0
        noisy = rician(clean, ref / snr, rng)
        image = noisy * np.float32(chain.level / ref)

    mask = np.zeros(image.shape, dtype=np.uint8)
    best = np.full(image.shape, 0.5, dtype=np.float32)
    # Voxels that are not normal tissue: any lesion, and oedema (which is not the mass, but not normal either).
    abnormal = np.maximum.reduce([*lesions.values(), fractions.get("edema", np.zeros_like(best))]) > 0.05
    for code, occ in lesions.items():
        if not shows(clean, occ, abnormal, shape):
            continue  # e.g. an infarct on T1: the study has it, this series' mask does not
        win = occ >= best
        mask[win], best[win] = MASK_LABELS[code], occ[win]
    return image.reshape(shape).astype(np.float32), mask.reshape(shape)


def shows(clean: np.ndarray, occ: np.ndarray, abnormal: np.ndarray, shape: tuple[int, int, int],
          min_contrast: float = VISIBLE_CONTRAST) -> bool:
    """Whether a lesion shows on a series: its core differs from the normal tissue around it by ``min_contrast``.

    A radiologist draws a lesion's mask on the sequences where it shows (a mass on
    T1 post-contrast and FLAIR, an acute infarct on DWI and ADC, WMH on FLAIR).
    The series' mask keeps only those lesions, so a segmentation model is never
    asked to find what its image does not contain.

    Args:
        clean: the noise-free image (N,) in C order (ADC: the noise-free map).
        occ: the lesion's occupancy (N,) in [0, 1].
        abnormal: (N,) bool, voxels of any lesion or oedema: the ring of normal tissue leaves them out.
        shape: (I, J, K).
        min_contrast: |core mean - ring mean| / ring mean that counts as showing.

    Returns:
        False when the lesion has no voxel at >= 0.5 occupancy, no normal tissue
        within 16 voxels, or too little contrast.
    """
    from scipy.ndimage import binary_dilation

    core = (occ >= 0.5).reshape(shape)
    if not core.any():
        return False
    normal, image = ~abnormal.reshape(shape), clean.reshape(shape)
    for reach in (2, 4, 8, 16):  # past the oedema around a mass
        ring = binary_dilation(core, iterations=reach) & normal
        if ring.sum() >= 20:
            break
    else:
        return False
    around = float(image[ring].mean())
    if around <= 0:
        return bool(image[core].mean() > 0)
    return abs(float(image[core].mean()) - around) / around >= min_contrast
