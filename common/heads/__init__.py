"""Light task heads on the frozen encoder, and the feature cache they train from.

The segmentation decoder (MONAI, slow to import), the feature cache and the
dense task specs (which import the metrics) load on first use, so that
importing the MLP heads stays cheap.
"""

from __future__ import annotations

from fedmri.heads.anomaly import AnomalyHead, build_anomaly_head
from fedmri.heads.mlp import MLPHead, SharedTrunk, build_mlp_head, build_trunk, pool_features, pooled_dim
from fedmri.lazy import lazy_attributes

_LAZY = {
    "DENSE_TASKS": "fedmri.heads.dense",
    "DenseInputs": "fedmri.heads.dense",
    "DenseTaskSpec": "fedmri.heads.dense",
    "dense_tasks": "fedmri.heads.dense",
    "lesion_target": "fedmri.heads.dense",
    "no_finding": "fedmri.heads.dense",
    "LightDecoder": "fedmri.heads.segmentation",
    "UNETRDecoder": "fedmri.heads.segmentation",
    "build_segmentation_head": "fedmri.heads.segmentation",
    "default_skip_layers": "fedmri.heads.segmentation",
    "skip_layers": "fedmri.heads.segmentation",
    "CachedFeatures": "fedmri.heads.features",
    "FeatureCache": "fedmri.heads.features",
    "build_feature_cache": "fedmri.heads.features",
    "preprocess_key": "fedmri.heads.features",
}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "AnomalyHead",
    "CachedFeatures",
    "DENSE_TASKS",
    "DenseInputs",
    "DenseTaskSpec",
    "FeatureCache",
    "MLPHead",
    "SharedTrunk",
    "UNETRDecoder",
    "build_anomaly_head",
    "build_feature_cache",
    "build_mlp_head",
    "build_trunk",
    "LightDecoder",
    "build_segmentation_head",
    "default_skip_layers",
    "dense_tasks",
    "lesion_target",
    "no_finding",
    "pool_features",
    "pooled_dim",
    "preprocess_key",
    "skip_layers",
]
