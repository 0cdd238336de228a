"""The metrics the simulation's tables show, written once for the terminal and for report.md.

Each :class:`Column` has the metric key, the label ``report.md`` uses, the shorter header of the
80-column terminal tables (``fedmri simulate``), and the format. Tables pick columns by key.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    short: str
    fmt: str


# The encoder's own probes.
PROBES = (
    Column("val_loss", "SSL loss", "SSL", "{:.3f}"),
    Column("knn_sequence_acc", "seq 1-NN", "seq 1-NN", "{:.2f}"),
    Column("knn_body_region_acc", "region 1-NN", "region 1-NN", "{:.2f}"),
    Column("i2t_r1", "i2t R@1", "i2t R@1", "{:.2f}"),
    Column("t2i_r1", "t2i R@1", "t2i R@1", "{:.2f}"),
    Column("t2i_r5", "t2i R@5", "t2i R@5", "{:.2f}"),
    Column("t2i_medr", "t2i MdR", "t2i MdR", "{:.1f}"),
    Column("num-examples", "series", "series", "{:.0f}"),
)
# The task heads of the heads stage. "In region": within the regions where each finding occurs
# (disease, not anatomy).
HEADS = (
    Column("findings_auroc_macro", "findings AUROC", "findings AUROC", "{:.2f}"),
    Column("findings_auroc_in_region_macro", "findings AUROC in region", "AUROC in region", "{:.2f}"),
    Column("sequence_accuracy", "sequence acc", "sequence acc", "{:.2f}"),
    Column("body_region_accuracy", "region acc", "region acc", "{:.2f}"),
    Column("age_mae", "age MAE (y)", "age MAE (y)", "{:.1f}"),
    Column("sex_auroc", "sex AUROC", "sex AUROC", "{:.2f}"),
)
# The lesion heads (heads.tasks segmentation, anomaly): mean Dice of the predicted mask, mean IoU
# of the anomaly map thresholded at 0.5, over the series with a lesion target (a mask, or no
# finding: all background), "lesion-free" of them: a head that finds no lesion anywhere scores
# Dice = lesion-free / series.
DENSE = (
    Column("segmentation_dice", "segmentation Dice", "segmentation Dice", "{:.2f}"),
    Column("anomaly_miou", "anomaly mIoU", "anomaly mIoU", "{:.2f}"),
    Column("dense-examples", "series", "series", "{:.0f}"),
    Column("lesion-free-examples", "lesion-free", "lesion-free", "{:.0f}"),
)
# The findings with no head: text prompts through the aligned space (fedmri.align.zeroshot).
ZEROSHOT_PREFIX = "zeroshot_"
ZEROSHOT = (
    Column("zeroshot_findings_auroc_macro", "zero-shot findings AUROC", "findings AUROC", "{:.2f}"),
    Column("zeroshot_findings_auroc_in_region_macro", "zero-shot findings AUROC in region", "AUROC in region",
           "{:.2f}"),
)
BY_KEY = {c.key: c for c in PROBES + HEADS + DENSE + ZEROSHOT}


def pick(*keys: str) -> tuple[Column, ...]:
    """The columns of ``keys``, in that order."""
    return tuple(BY_KEY[k] for k in keys)
