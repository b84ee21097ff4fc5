"""Semantic segmentation: FCN (VGG-16 FCN-32s/16s/8s, ResNet FCN), DeepLabV3 and PSPNet, their metrics, and
the import of torchvision's segmentation weights.

Files: ``model.py`` (config, model, builder, ``predict_mask``), ``heads.py`` (FCN head, ASPP, pyramid
pooling), ``fcn_vgg.py`` (Long et al.'s skip architecture), ``metrics.py`` (confusion matrix, mIoU ...),
``threshold.py`` (the pixel threshold of best mIoU), ``class_weights.py`` (loss weights for rare classes),
``torchvision_weights.py`` (torchvision's weights imported), ``export.py`` (the export graph).
"""

from vision.segmentation.metrics import (
    IGNORE_INDEX,
    SegmentationMetric,
    confusion_matrix,
    metrics_from_confusion,
)
from vision.segmentation.model import (
    ARCHS,
    SegmentationConfig,
    SegmentationModel,
    build_segmentation_model,
    predict_mask,
    segmentation_loss,
)
from vision.segmentation.torchvision_weights import (
    TORCHVISION_ARCHS,
    convert_torchvision_state_dict,
    load_torchvision_segmentation,
    save_torchvision_segmentation,
)

__all__ = [
    "ARCHS", "IGNORE_INDEX", "TORCHVISION_ARCHS", "SegmentationConfig", "SegmentationMetric",
    "SegmentationModel", "build_segmentation_model", "confusion_matrix", "convert_torchvision_state_dict",
    "load_torchvision_segmentation", "metrics_from_confusion", "predict_mask",
    "save_torchvision_segmentation", "segmentation_loss",
]
