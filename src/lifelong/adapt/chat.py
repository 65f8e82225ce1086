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

Images: nothing here sees them yet; `check_image` says what a given path is, and that seeing needs the
multimodal adapter (issue 17 item 3).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lifelong.errors import ConfigError
from lifelong.families.lm import context_length, lm_fingerprint
from lifelong.metrics.editing import generate

PEFT_META = "lifelong.json"  # what `lifelong export --peft` writes beside peft's files


def check_image(path: str | Path) -> None:
    """Refuse `--image` (always, for now), saying whether `path` is an image at all."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--image {path}: no such file")
    try:
        with Image.open(path) as im:
            im.verify()
            kind = f"a {im.format} image of {im.width}x{im.height}"
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ConfigError(f"--image {path} is not an image ({type(e).__name__}: {e})") from None
    raise ConfigError(f"--image {path} is {kind}, but chat cannot see images yet: seeing needs the multimodal "
                      "adapter (issue 17 item 3), which lifelong does not have yet; ask without --image")


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
