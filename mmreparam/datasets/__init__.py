"""Synthetic data for the demo and the end-to-end tests."""
from .synthetic import (
                        CLASSES,
                        SEG_CLASSES,
                        SEG_PALETTE,
                        generate_cityscapes_segmentation,
                        generate_coco_detection,
)

__all__ = ['CLASSES', 'SEG_CLASSES', 'SEG_PALETTE', 'generate_coco_detection',
           'generate_cityscapes_segmentation']
