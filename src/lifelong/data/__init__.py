"""Data that installs offline: image sources (`load_source`), continual-learning task streams (`build_stream`),
knowledge-edit requests (`edit_requests`) and the captioned pool of the text-to-image model (`captioned`)."""

from lifelong.data.base import ImageDataset, Stream, Task
from lifelong.data.sources import SOURCES, load_source, source_names
from lifelong.data.streams import PRESETS, StreamSpec, TaskSpec, build_stream, stream_spec

__all__ = [
    "ImageDataset", "Stream", "Task", "SOURCES", "load_source", "source_names",
    "PRESETS", "StreamSpec", "TaskSpec", "build_stream", "stream_spec",
]
