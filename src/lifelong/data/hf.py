"""Any image-classification dataset in the Hugging Face `datasets` format.

`path` is a hub name ("fashion_mnist", "tanganke/eurosat"; needs internet or a filled HF cache), a
builder with `data_dir` ("imagefolder" + a local folder), or a folder written by `save_to_disk`
(read with `load_from_disk`). The `train_split` and `test_split` splits are used when both exist;
when only `train_split` exists (or a saved single Dataset), it is split once with the fixed seed.

Class names come from `class_names` when given, else from the label column's ClassLabel feature, else
(string labels) from the sorted label values. Images are converted to RGB; with `size` they are
centre-cropped and resized, without it they must all share one native size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from lifelong.data.imagefolder import square_resize
from lifelong.data.splits import SPLIT_SEED, readable, stratified_split
from lifelong.errors import ConfigError, DataFormatError, DataNotFoundError


def load_hf(
    split: str,
    path: str | None = None,
    name: str | None = None,
    data_dir: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    image_column: str = "image",
    label_column: str = "label",
    class_names: list[str] | None = None,
    size: int | None = None,
    test_fraction: float = 0.2,
):
    if path is None:
        raise ConfigError("hf: option `path` is required (a hub dataset name or a local dataset folder)")
    data = open_dataset(str(path), name, data_dir)

    if hasattr(data, "keys"):  # a DatasetDict
        available = list(data.keys())
        if train_split not in data:
            raise DataFormatError(f"hf: {path} has no split {train_split!r} (splits: {available}); set `train_split`")
        pool = None if test_split in data else data[train_split]
        ds = data[train_split if split == "train" else test_split] if pool is None else pool
    else:  # a single saved Dataset
        pool = ds = data

    missing = [c for c in (image_column, label_column) if c not in ds.column_names]
    if missing:
        raise DataFormatError(f"hf: {path} has no column {missing} (columns: {ds.column_names}); "
                              f"set `image_column` / `label_column`")
    raw_labels = list(ds[label_column])
    names, labels = _labels(path, ds.features[label_column], raw_labels, class_names)

    if pool is not None:  # one pool: make the fixed split
        train, test = stratified_split(labels, test_fraction, SPLIT_SEED)
        keep = train if split == "train" else test
        ds, labels = ds.select(keep.tolist()), labels[keep]

    images = [_to_array(im, size) for im in ds[image_column]]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DataFormatError(f"hf: images in {path} differ in size ({sorted(shapes)[:3]}...); set option `size`")
    stacked = np.stack(images) if images else np.zeros((0, size or 1, size or 1, 3), np.uint8)
    return stacked, labels, names


def open_dataset(path: str, name: str | None, data_dir: str | None):
    """`load_from_disk` for a folder written by save_to_disk, `load_dataset` for anything else."""
    try:
        import datasets  # heavy optional dependency (Hugging Face datasets), imported at first use
    except ImportError as e:
        raise DataNotFoundError("the hf source needs `datasets`: pip install datasets==5.2.0") from e
    folder = Path(path).expanduser()
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        return datasets.load_from_disk(str(folder))
    try:
        return datasets.load_dataset(path, name=name, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 -- datasets raises many types; all mean "cannot get this dataset"
        raise DataNotFoundError(
            f"hf: cannot load dataset {path!r} ({type(e).__name__}: {e}). A hub dataset needs internet access "
            f"or a copy in the HF cache; a local one can be a folder written by Dataset.save_to_disk."
        ) from e


def _labels(path, feature, raw: list, class_names) -> tuple[tuple[str, ...], np.ndarray]:
    """Class names and int64 labels from the label column."""
    if all(isinstance(v, str) for v in raw) and raw:
        names = list(class_names) if class_names is not None else sorted(set(raw))
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise ConfigError(f"hf: labels {unknown[:5]} of {path} are not in `class_names`")
        index = {n: i for i, n in enumerate(names)}
        return tuple(readable(n) for n in names), np.array([index[v] for v in raw], dtype=np.int64)

    labels = np.asarray(raw, dtype=np.int64)
    if class_names is not None:
        names = [str(n) for n in class_names]
    elif hasattr(feature, "names"):  # datasets.ClassLabel
        names = list(feature.names)
    else:
        raise ConfigError(f"hf: the label column of {path} has no ClassLabel names; pass option `class_names`")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise DataFormatError(f"hf: labels of {path} span {labels.min()}..{labels.max()} "
                              f"but there are {len(names)} class names")
    return tuple(readable(n) for n in names), labels


def _to_array(image, size: int | None) -> np.ndarray:
    """A decoded PIL image (or an array) -> (H, W, 3) uint8."""

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    image = image.convert("RGB")
    return square_resize(image, size) if size else np.asarray(image, dtype=np.uint8)
