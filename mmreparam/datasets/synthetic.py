"""Deterministic synthetic scenes for the demo and the end-to-end tests (no downloads).

Each scene is a textured background with a few filled shapes (square, circle, triangle) of
random size and colour: easy enough that a small detector or segmentor learns them in a few
hundred CPU iterations, real enough to exercise the whole train / fold / test pipeline.

- :func:`generate_coco_detection` writes a COCO-format detection set (boxes, polygon masks);
- :func:`generate_cityscapes_segmentation` writes a Cityscapes-format segmentation set
  (``leftImg8bit`` / ``gtFine`` folders, ``*_gtFine_labelTrainIds.png`` label maps).

The same ``seed`` always gives byte-identical files.
"""
import json
import math
import os
import os.path as osp
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ('square', 'circle', 'triangle')
#: Segmentation classes: background first, then the shapes.
SEG_CLASSES = ('background', ) + CLASSES
SEG_PALETTE = [[0, 0, 0], [220, 20, 60], [0, 130, 200], [250, 190, 30]]


def _shape_polygon(kind: str, cx: float, cy: float, r: float) -> List[Tuple[float, float]]:
    if kind == 'square':
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if kind == 'triangle':
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return [(cx + r * math.cos(a), cy + r * math.sin(a))
            for a in np.linspace(0, 2 * math.pi, 24, endpoint=False)]


def _scene(rng: np.random.RandomState, size: int) -> Tuple[Image.Image, Image.Image, list]:
    """One image, its label map (class index per pixel) and its objects."""
    base = rng.randint(40, 120, size=3)
    ramp = np.linspace(0, 40, size)[None, :, None] * rng.uniform(-1, 1, size=3)
    noise = rng.normal(0, 8, size=(size, size, 3))
    pixels = np.clip(base + ramp + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    labels = Image.new('L', (size, size), 0)
    draw, draw_labels = ImageDraw.Draw(image), ImageDraw.Draw(labels)
    objects = []
    for _ in range(rng.randint(1, 4)):
        kind = CLASSES[rng.randint(len(CLASSES))]
        r = float(rng.randint(size // 10, size // 4))
        cx, cy = (float(rng.randint(int(r), size - int(r))) for _ in range(2))
        polygon = _shape_polygon(kind, cx, cy, r)
        colour = tuple(int(c) for c in rng.randint(150, 256, size=3))
        draw.polygon(polygon, fill=colour)
        draw_labels.polygon(polygon, fill=CLASSES.index(kind) + 1)
        xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
        objects.append(dict(kind=kind, polygon=polygon,
                            bbox=[min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]))
    return image, labels, objects


def generate_coco_detection(root: str, num_train: int = 64, num_val: int = 16,
                            size: int = 128, seed: int = 0) -> Dict[str, str]:
    """Write a COCO-format detection set under ``root``.

    Layout: ``root/{train,val}/*.png`` and ``root/annotations/instances_{train,val}.json``
    with categories :data:`CLASSES`, boxes and polygon masks. Later shapes may cover earlier
    ones; their boxes are kept (as in real data with occlusion).

    Returns:
        dict: The annotation file of each split.
    """
    rng = np.random.RandomState(seed)
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    files = {}
    for split, count in (('train', num_train), ('val', num_val)):
        os.makedirs(osp.join(root, split), exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            image, _, objects = _scene(rng, size)
            name = f'{split}_{index:05d}.png'
            image.save(osp.join(root, split, name))
            images.append(dict(id=index + 1, file_name=name, width=size, height=size))
            for obj in objects:
                x, y, w, h = obj['bbox']
                annotations.append(dict(
                    id=len(annotations) + 1, image_id=index + 1,
                    category_id=CLASSES.index(obj['kind']) + 1, bbox=[x, y, w, h],
                    area=w * h, iscrowd=0,
                    segmentation=[[c for p in obj['polygon'] for c in p]]))
        coco = dict(images=images, annotations=annotations,
                    categories=[dict(id=i + 1, name=n) for i, n in enumerate(CLASSES)])
        path = osp.join(root, 'annotations', f'instances_{split}.json')
        with open(path, 'w') as f:
            json.dump(coco, f)
        files[split] = path
    return files


def generate_cityscapes_segmentation(root: str, num_train: int = 64, num_val: int = 16,
                                     size: int = 128, seed: int = 1) -> Dict[str, str]:
    """Write a Cityscapes-format segmentation set under ``root``.

    Layout: ``root/leftImg8bit/{split}/synth/synth_NNNNNN_000019_leftImg8bit.png`` and
    ``root/gtFine/{split}/synth/synth_NNNNNN_000019_gtFine_labelTrainIds.png`` with class
    indices of :data:`SEG_CLASSES`.

    Returns:
        dict: The image folder of each split.
    """
    rng = np.random.RandomState(seed)
    folders = {}
    for split, count in (('train', num_train), ('val', num_val)):
        img_dir = osp.join(root, 'leftImg8bit', split, 'synth')
        ann_dir = osp.join(root, 'gtFine', split, 'synth')
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        for index in range(count):
            image, labels, _ = _scene(rng, size)
            stem = f'synth_{index:06d}_000019'
            image.save(osp.join(img_dir, f'{stem}_leftImg8bit.png'))
            labels.save(osp.join(ann_dir, f'{stem}_gtFine_labelTrainIds.png'))
        folders[split] = img_dir
    return folders
