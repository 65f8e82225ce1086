"""Shared fixtures: a tiny real-data stream and tiny random dual encoders (built from a config)."""

import copy
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_stream():
    from lifelong.data.streams import build_stream, stream_spec

    return build_stream(stream_spec("tiny"))


@pytest.fixture(scope="session")
def tiny_config():
    from lifelong.learn.driver import load_run_config

    return load_run_config(None, ["model.name=tiny-embedded", "model.resolution=32", "model.trainable_blocks=2",
                              "stream.name=tiny", "train.steps_per_task=4", "train.batch_size=8", "train.lr=1e-3"])


@pytest.fixture(scope="session")
def _tiny_models():
    from lifelong.config import ModelConfig
    from lifelong.families.vlm import build_vlm

    return {
        "tiny-embedded": build_vlm(ModelConfig(name="tiny-embedded", resolution=32, trainable_blocks=2)),
        "tiny-clip": build_vlm(ModelConfig(name="tiny-clip", trainable_blocks=1)),
    }


@pytest.fixture
def tiny_model(_tiny_models):
    """A fresh copy of the tiny embedded-style dual encoder."""
    return copy.deepcopy(_tiny_models["tiny-embedded"])


@pytest.fixture
def tiny_clip(_tiny_models):
    return copy.deepcopy(_tiny_models["tiny-clip"])


@pytest.fixture(scope="session")
def tiny_stem(tiny_stream, _tiny_models):
    from lifelong.loop import compute_stem_features

    return compute_stem_features(_tiny_models["tiny-embedded"], tiny_stream, 64)
