"""One answer from a causal LM, optionally through a peft adapter: what `lifelong chat` runs.

The prompt goes through the tokenizer's chat template as the user's turn when the tokenizer has one
(metrics.editing.as_chat), and the answer is greedy (the same decoding the instruction tasks are scored with).
A prompt longer than the model's context, less the answer's `max_new_tokens`, keeps its last tokens, and
`warn` says so (metrics.editing.generate).

An adapter folder is peft's (adapter_config.json + adapter_model.safetensors). One exported from a ledger
(`lifelong export DIR --peft OUT`) also holds lifelong.json with the SHA-256 of the model it was trained on;
it is refused on any other model, naming both. Without that file, peft's `base_model_name_or_path` is
compared with the model's name (a folder by its resolved path), and a checkpoint whose shapes do not fit is
refused too.

Images: `--image PATH` with `--adapter FILE`, a vision module (the multimodal LLaMA-Adapter or the bridge of
adapt/seeing.py, one safetensors file that benchmarks/adapters_vision.py saves): the image goes through the image
tower it was trained with, and the module feeds it to the LM (`answer_about_image`). A path that is not an image
is refused with one message (`check_image`), so is an image without a vision module, and a module trained on
another LM (naming both fingerprints).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from lifelong.adapt.seeing import is_vision_module, open_image
from lifelong.errors import ConfigError
from lifelong.families.lm import context_length, lm_fingerprint
from lifelong.metrics.editing import generate

PEFT_META = "lifelong.json"  # what `lifelong export --peft` writes beside peft's files


def check_image(path: str | Path) -> str:
    """What the image at `path` is ("a PNG image of 8x8"); a clear error when it is no file or not an image."""
    im = open_image(path)
    return f"a {im.format} image of {im.width}x{im.height}"


def check_vision_request(image: str | Path | None, adapter: str | Path | None) -> bool:
    """Whether this chat sees an image through a vision module; refused when only one of the two is given."""
    vision = adapter is not None and is_vision_module(adapter)
    if image is not None:
        kind = check_image(image)
        if not vision:
            raise ConfigError(f"--image {image} is {kind}, but seeing needs a vision module: --adapter FILE, a "
                              "multimodal adapter or bridge file (benchmarks/adapters_vision.py saves both); "
                              f"{'a peft adapter folder only reads text' if adapter is not None else 'none was given'}")
    elif vision:
        raise ConfigError(f"--adapter {adapter} is a vision module: give the image to ask about, --image PATH")
    return vision


def load_adapter(model, folder: str | Path, model_name: str):
    """`model` with the peft adapter in `folder` on it (peft's PeftModel), after checking it was built for this
    model (`model_name` names it in messages)."""
    from peft import PeftModel  # heavy optional dependency, imported at first use

    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise ConfigError(f"--adapter {folder} is not a peft adapter folder (no adapter_config.json)")
    meta_path = folder / PEFT_META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        found = lm_fingerprint(model)
        if meta["trained_on_sha256"] != found:
            raise ConfigError(f"the adapter in {folder} was built for another base model: {meta['load_onto']} "
                              f"({meta['base']!r}, SHA-256 {meta['trained_on_sha256'][:12]}), not for {model_name} "
                              f"(SHA-256 {found[:12]})")
    else:
        base = json.loads(config_path.read_text()).get("base_model_name_or_path")
        if base and not _same_model(base, model_name):
            raise ConfigError(f"the adapter in {folder} was built for another base model: {base!r} (its "
                              f"adapter_config.json), not {model_name!r}")
    try:
        adapted = PeftModel.from_pretrained(model, str(folder))
    except (RuntimeError, ValueError, KeyError) as e:  # tensors of other shapes, a config for another architecture
        raise ConfigError(f"the adapter in {folder} does not fit {model_name!r} (built for another base model?): "
                          f"{str(e).splitlines()[0]}") from None
    adapted.eval()
    return adapted


def answer(model, tokenizer, prompt: str, max_new_tokens: int = 128,
           warn: Callable[[str], None] | None = None) -> str:
    """The greedy answer to `prompt` (through the chat template when the tokenizer has one)."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    limit = context_length(model)
    if limit is not None and max_new_tokens >= limit:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} leaves no room for the prompt: the model reads {limit} "
                          "tokens at once")
    return generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, batch_size=1, chat=True,
                    max_length=limit, warn=warn)[0].strip()


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
