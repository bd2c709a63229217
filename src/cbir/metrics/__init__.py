"""Every metric of cbir, and the box operations the detectors share (docs/metrics.md lists
what each module computes and what it is checked against).

Streaming metrics follow torchmetrics: ``update`` batch by batch, ``compute``, ``reset``;
they accept numpy arrays and torch tensors.
"""

from cbir.metrics.boxes import (
    batched_diou_nms, batched_nms, batched_soft_nms, box_area, box_ciou, box_convert, box_diou,
    box_giou, box_iou, ciou_loss, cxcywh_to_xyxy, diou_loss, diou_nms, giou_loss, iou_loss, nms,
    soft_nms, xywh_to_xyxy, xyxy_to_cxcywh, xyxy_to_xywh,
)
from cbir.metrics.classification import (
    AveragePrecision, ClassificationMetrics, average_precision_score, confusion_matrix,
    precision_recall_curve, precision_recall_fscore,
)
from cbir.metrics.detection import DetectionMAP, interpolated_ap, mean_average_precision
from cbir.metrics.localization import (
    LocalizationAccuracy, MaskLocalization, cam_boxes, max_box_acc_v2, max_box_iou, pxap,
)
from cbir.metrics.retrieval import (
    RetrievalMAP, ap_from_positive_ranks, average_precision, positive_ranks, precision_at_k,
    recall_at_k, ukbench_ns_score,
)
from cbir.metrics.segmentation import SegmentationMetrics, segmentation_scores

__all__ = [
    "AveragePrecision", "ClassificationMetrics", "DetectionMAP", "LocalizationAccuracy",
    "MaskLocalization", "RetrievalMAP", "SegmentationMetrics", "ap_from_positive_ranks",
    "average_precision", "average_precision_score", "batched_diou_nms", "batched_nms",
    "batched_soft_nms", "box_area", "box_ciou", "box_convert", "box_diou", "box_giou", "box_iou",
    "ciou_loss", "confusion_matrix", "cxcywh_to_xyxy", "diou_loss", "diou_nms", "giou_loss",
    "interpolated_ap", "iou_loss", "max_box_iou", "max_box_acc_v2", "cam_boxes", "pxap",
    "mean_average_precision", "nms", "positive_ranks", "precision_at_k", "precision_recall_curve",
    "precision_recall_fscore", "recall_at_k", "segmentation_scores", "soft_nms", "ukbench_ns_score",
    "xywh_to_xyxy", "xyxy_to_cxcywh", "xyxy_to_xywh",
]
