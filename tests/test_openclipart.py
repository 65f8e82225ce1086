"""The openclipart source and reference drawings (Debian openclipart-png; skipped where not installed)."""

import numpy as np
import pytest

from lifelong.data import openclipart
from lifelong.data.reference import reference_images, reference_texts
from lifelong.data.sources import load_source
from lifelong.data.streams import stream_spec

needs_clipart = pytest.mark.skipif(not openclipart.ROOT.is_dir(), reason="openclipart-png is not installed")


def test_the_long_stream_has_at_least_eight_tasks():
    spec = stream_spec("mtil-long")
    assert len(spec.tasks) >= 8
    assert sum(t.source == "openclipart" for t in spec.tasks) == len(openclipart.GROUPS)


@needs_clipart
def test_a_group_is_a_five_class_task_with_disjoint_fixed_splits():
    train = load_source("openclipart", "train", group="nature", size=32)
    test = load_source("openclipart", "test", group="nature", size=32)
    assert train.class_names == test.class_names == ("flower", "tree", "smiley face", "stick figure", "house")
    assert train.images.shape[1:] == (32, 32, 3) and set(np.unique(train.labels)) == set(range(5))
    assert len(test) == pytest.approx(0.25 * len(train), rel=0.2)  # 80/20 by file
    train_rows = {row.tobytes() for row in train.images}
    assert sum(row.tobytes() in train_rows for row in test.images) <= 1  # (a duplicate drawing may exist)
    assert load_source("openclipart", "test", group="nature", size=32).fingerprint == test.fingerprint


@needs_clipart
def test_reference_drawings_come_from_folders_no_task_uses():
    used = [openclipart.ROOT / f for classes in openclipart.GROUPS.values() for _, folders in classes for f in folders]
    files = openclipart.reference_files()
    assert len(files) > 5000
    assert not any(p.is_relative_to(u) for p in files for u in used)
    mixed = reference_images(20, 32, 0, "photos+openclipart")
    assert len(mixed) == 20 and (mixed.labels == len(mixed.class_names) - 1).sum() == 10
    assert len(reference_texts("photos+openclipart")) > len(reference_texts()) + 5000
