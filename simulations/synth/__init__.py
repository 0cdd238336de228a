"""Synthetic hospitals: DICOM series, reports, labels and masks for a non-IID federation.

``generate_federation(out_dir, sites=3)`` writes ``out_dir/site-01`` ...; each
site folder holds ``dicom/`` (nested folders, opaque file names),
``reports.csv``, ``labels.csv``, ``masks/*.nii.gz``, ``series.csv`` (per-series
ground truth: region, sequence family, plane) and ``site.json`` (the site's
generation parameters and profile).
"""

from fedmri.simulations.synth.federation import generate_federation
from fedmri.simulations.synth.generate import SiteInfo, generate_site
from fedmri.simulations.synth.layout import PRESETS

__all__ = ["PRESETS", "SiteInfo", "generate_federation", "generate_site"]
