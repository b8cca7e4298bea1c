"""Semantic segmentation with R-CNN features on region masks (paper §4).

Pipeline: :func:`~rcnn.segmentation.regions.mask_proposals` (selective search's grouping,
keeping masks, plus unions of neighbouring regions, ranked by a learned CPMC-style regressor,
plus masks from a learned mask head on CNN features snapped to superpixels, :mod:`~rcnn.segmentation.maskhead`) → :func:`~rcnn.segmentation.features.region_features` (``full`` / ``fg``
/ ``full+fg``) → :func:`~rcnn.segmentation.model.train_segmenter` (per-class ``LinearSVR``
on mask IoU) → :func:`~rcnn.segmentation.model.paste` (O2P inference) →
:class:`~rcnn.segmentation.metrics.SegmentationEvaluator` (VOC measure).
"""

from rcnn.segmentation.features import STRATEGIES, RegionFeatureConfig, combine, region_features, warp_masks
from rcnn.segmentation.maskhead import MaskHead, MaskPredictor, load_mask_head, train_mask_head
from rcnn.segmentation.masks import (
    MaskError,
    class_label_map,
    class_masks,
    colorize,
    instance_masks,
    load_segmentation_dataset,
    overlay,
    read_voc_segmentation,
    save_label_png,
)
from rcnn.segmentation.metrics import (
    SegmentationEvaluator,
    image_confusions,
    mean_iou,
    paired_bootstrap,
    segmentation_iou,
)
from rcnn.segmentation.model import (
    FeatureCacheMiss,
    ImageRegions,
    SegmentationModel,
    choose_threshold,
    evaluate_segmenter,
    paste,
    prepare_dataset,
    prepare_image,
    segment_image,
    train_segmenter,
)
from rcnn.segmentation.ranking import ForestRanker
from rcnn.segmentation.regions import (
    MaskProposalConfig,
    RegionMasks,
    get_mask_proposals,
    hierarchical_grouping,
    mask_proposals,
    mask_recall,
    train_mask_ranker,
)

__all__ = [
    "STRATEGIES", "FeatureCacheMiss", "ForestRanker", "ImageRegions", "MaskError", "MaskHead", "MaskPredictor", "MaskProposalConfig", "RegionFeatureConfig", "RegionMasks",
    "SegmentationEvaluator", "SegmentationModel", "choose_threshold", "class_label_map", "class_masks",
    "colorize", "combine", "evaluate_segmenter", "get_mask_proposals", "hierarchical_grouping",
    "image_confusions", "instance_masks", "load_mask_head", "load_segmentation_dataset", "mask_proposals", "mask_recall", "mean_iou", "overlay",
    "paired_bootstrap", "paste",
    "prepare_dataset", "prepare_image", "read_voc_segmentation", "region_features", "save_label_png",
    "segment_image", "segmentation_iou", "train_mask_head", "train_mask_ranker", "train_segmenter", "warp_masks",
]
