"""Seeing: teach a frozen causal LM to answer questions about images through a small module, the LM and the
image encoder frozen.

    kind                 what trains                                                   from
    multimodal-adapter   adaption prompts + zero-init gates in the top L layers, plus    modules/multimodal_adapter.py
                         a projection of the image's global feature added to every
                         prompt (LLaMA-Adapter's multimodal form, Zhang et al. ICLR 2024)
    bridge               N learnable queries cross-attending to the image's spatial      modules/query_bridge.py
                         features, projected to soft prompts prepended to the prompt's
                         embeddings (BLIP-2's Q-Former / ChatBridge, reduced)

The image encoder is the vlm family's image tower (the embedded EfficientNet-Lite0, ImageNet weights): its
pooled feature feeds the adapter, the feature map before the pool the bridge (families.vlm.DualEncoder.
image_features). Both are computed once per image and kept in the disk cache (lifelong.cache, keyed by the
tower's weights and the images' bytes), so a training step runs only the LM and the module.

The task (`image_questions`): "What is shown in this image?" about real images that install offline, answered
by the class name: Fashion-MNIST (10 garments), MNIST digits ("seven"), both dark on light (`invert`, as the
project's streams feed the ImageNet tower), and the animals of Debian's openclipart-png (bird, mammal, fish,
insect, dinosaur); each source's fixed train/test split (data.sources). And about data.captioned's rendered capital
letters (A B C E G K R S in 6 type styles and 4 inks; its training and test renders are different draws): "What colour
is the letter?" (the ink: black, red, green, blue) and "Which letter is this?", both about the same images, so the
question alone decides which answer. And "How many digits are there?" about 1 to 4 real MNIST digits of the split,
pasted into random cells of a 2 x 2 grid on white (`counting_pool`: no source here has countable objects of its own,
so the scenes are composed; the digits are real, the answer is "one" to "four"). One module learns every question
type, its batches mixing them.

The loss is the mean NLL of the answer tokens (the answer, then the end-of-sequence token; the prompt's tokens
masked), with the LM's output layer applied only at the positions that predict an answer token (the same loss,
without 49k-word logits for every prompt position). The score is the greedy answer's exact match / contains
(metrics.instructions; the letter "A" compared unnormalised, see `score_answers`), what a user of
`lifelong chat --image` sees. AdamW, weight decay 0.02, cosine schedule with 10% linear warm-up (as
adapt/instruct.py).

A trained module is saved as one safetensors file (`save_vision_module`: its tensors, and in the metadata its kind,
its constructor arguments, the prompt format, the SHA-256 of the LM it was trained on and of the image tower);
`load_vision_module` refuses it on another LM or tower, naming both fingerprints. `lifelong chat --model M
--adapter FILE --image PATH` answers through it (adapt/chat.py).
"""

from __future__ import annotations

import hashlib
import json
import string
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from lifelong.adapt.instruct import AdapterRun, TrainSettings, run_steps
from lifelong.atomic import atomic_write_bytes
from lifelong.cache import cached, content_key
from lifelong.config import ModelConfig
from lifelong.data.captioned import letter_pool
from lifelong.data.instructions import Example, prompt_text
from lifelong.data.sources import load_source
from lifelong.data.splits import subsample_indices
from lifelong.errors import ConfigError
from lifelong.families.lm import context_length, lm_fingerprint, target_batch
from lifelong.families.vlm import DualEncoder, build_vlm
from lifelong.fingerprint import tensor_digest
from lifelong.metrics.instructions import contains, exact_match, first_line, normalize
from lifelong.modules.multimodal_adapter import MultimodalAdapter
from lifelong.modules.query_bridge import QueryBridge, width_for_budget

KINDS = ("multimodal-adapter", "bridge")
DEFAULT_LR = {"multimodal-adapter": 9e-3, "bridge": 2e-3}  # LLaMA-Adapter's lr; the bridge's chosen for short runs
# question type -> the question: "what" about every source's images, "colour" and "letter" about the rendered letters
QUESTIONS = {"what": "What is shown in this image?", "colour": "What colour is the letter?",
             "letter": "Which letter is this?", "count": "How many digits are there?"}
QUESTION = QUESTIONS["what"]
PLAIN = "Question: {}\nAnswer:"  # the prompt without the chat template (short: a CPU step costs per token)
# (source, options): the images `image_questions` asks "what" about by default
SOURCES = (("fashion-mnist", {"invert": True}), ("mnist", {"invert": True}), ("openclipart", {"group": "animals"}))
LETTER_QUESTIONS = ("colour", "letter")  # what `image_questions` asks about each rendered letter by default
NUMBER_WORDS = ("one", "two", "three", "four")  # the counting question's answers: 1-4 digits on a 2 x 2 grid
SPLIT_SEEDS = {"train": 0, "test": 1}  # the counting scenes' draws differ between splits
FORMAT = "lifelong-vision-module/1"  # the metadata tag of a saved module


# ----------------------------------------------------------------------------- the task

@dataclass(frozen=True)
class ImageQuestions:
    """One split of the image-question task: the images of each source (sizes differ between sources), and the
    questions about them, each with its image, type and answer. One image may be asked several questions (a
    rendered letter: its colour and which letter), so only the question decides the answer."""

    parts: tuple[np.ndarray, ...]     # per source: (N_s, H_s, W_s, 3) uint8
    images: tuple[int, ...]           # per question: its image's row in the parts concatenated
    kinds: tuple[str, ...]            # per question: its type, a key of QUESTIONS
    answers: tuple[str, ...]          # per question: the class name, the ink's name, the letter
    sources: tuple[str, ...]          # per question: its image's source
    choices: dict[str, tuple[str, ...]]  # per question type: every answer of it (what CLIP's zero-shot chooses from)

    def __len__(self) -> int:
        return len(self.answers)

    @property
    def questions(self) -> tuple[str, ...]:
        return tuple(QUESTIONS[k] for k in self.kinds)

    def image(self, i: int) -> np.ndarray:
        """(H, W, 3) uint8: the image question i is about."""
        row = self.images[i]
        for part in self.parts:
            if row < len(part):
                return part[row]
            row -= len(part)
        raise IndexError(i)

    def of_kind(self, kind: str) -> list[int]:
        """The positions of the questions of type `kind`."""
        return [i for i, k in enumerate(self.kinds) if k == kind]


def counting_pool(split: str, n: int, seed: int = 0) -> tuple[np.ndarray, tuple[str, ...]]:
    """n scenes of 1 to 4 real MNIST digits of `split` (dark on white) in random cells of a 2 x 2 grid of 28-px
    cells, (n, 56, 56, 3) uint8, and their counts in words; the counts cycle 1, 2, 3, 4 (balanced), the cells and
    digits drawn by a generator seeded with `seed` and the split (a test scene never reuses a training digit: the
    splits are disjoint)."""
    digits = load_source("mnist", split, invert=True).images  # (N, 28, 28, 3), white background
    rng = np.random.default_rng([seed, SPLIT_SEEDS[split]])
    cell = digits.shape[1]
    scenes = np.full((n, 2 * cell, 2 * cell, 3), 255, dtype=np.uint8)
    counts = [i % len(NUMBER_WORDS) + 1 for i in range(n)]
    for scene, k in zip(scenes, counts):
        for where, which in zip(rng.choice(4, k, replace=False), rng.choice(len(digits), k, replace=False)):
            row, col = divmod(int(where), 2)
            scene[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell] = digits[which]
    return scenes, tuple(NUMBER_WORDS[k - 1] for k in counts)


def image_questions(split: str, items_per_source: int | None = None, seed: int = 0,
                    sources: tuple[tuple[str, dict], ...] = SOURCES,
                    letter_questions: tuple[str, ...] = LETTER_QUESTIONS, counting: bool = True) -> ImageQuestions:
    """The fixed `split` of every source, each subsampled to `items_per_source` images keeping class proportions,
    asked "what is shown"; then, when `letter_questions` names any, as many of data.captioned's letter renders of
    `split` (8 letters x 6 type styles x 4 inks; the test renders are other draws than the training ones), each
    asked every question of `letter_questions` ("colour": the ink's name, "letter": the letter); then, with
    `counting`, as many scenes of `counting_pool` asked "how many digits" (120 when `items_per_source` is None)."""
    unknown = [k for k in letter_questions if k not in ("colour", "letter")]
    if unknown:
        raise ConfigError(f"letter questions {unknown} are not 'colour' or 'letter'")
    parts, images, kinds, answers, origin, choices = [], [], [], [], [], {}
    for name, options in sources:
        data = load_source(name, split, max_items=items_per_source, seed=seed, **options)
        images += range(sum(map(len, parts)), sum(map(len, parts)) + len(data.labels))
        parts.append(data.images)
        kinds += ["what"] * len(data.labels)
        answers += [data.class_names[i] for i in data.labels]
        choices["what"] = tuple(dict.fromkeys([*choices.get("what", ()), *data.class_names]))
        origin += [name] * len(data.labels)
    if letter_questions:
        pixels, ids, concepts = letter_pool(split)
        keep = subsample_indices(ids, items_per_source, seed)
        first = sum(map(len, parts))
        parts.append(pixels[keep])
        for kind in letter_questions:  # the concept's attribute of that name
            images += range(first, first + len(keep))
            kinds += [kind] * len(keep)
            answers += [concepts[i].attribute(kind) for i in ids[keep]]
            choices[kind] = tuple(dict.fromkeys(c.attribute(kind) for c in concepts))
            origin += ["letters"] * len(keep)
    if counting:
        scenes, counts = counting_pool(split, items_per_source or 120, seed)
        first = sum(map(len, parts))
        parts.append(scenes)
        images += range(first, first + len(scenes))
        kinds += ["count"] * len(scenes)
        answers += counts
        choices["count"] = NUMBER_WORDS
        origin += ["counting"] * len(scenes)
    return ImageQuestions(tuple(parts), tuple(images), tuple(kinds), tuple(answers), tuple(origin), choices)


# ----------------------------------------------------------------------------- the frozen image tower, cached

def vision_fingerprint(vlm: DualEncoder) -> str:
    """SHA-256 of what turns pixels into features: the image tower's weights and its preprocessing."""
    tensors = {f"image_stem.{k}": v for k, v in vlm.image_stem.state_dict().items()}
    tensors |= {f"image_trunk.{k}": v for k, v in vlm.image_trunk.state_dict().items()}
    return tensor_digest(tensors, json.dumps([vlm.kind, asdict(vlm.image_spec)]).encode())


def image_features(vlm: DualEncoder, images: np.ndarray, batch_size: int = 128,
                   tower: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled (N, F), spatial (N, S, F)) of (N, H, W, 3) uint8 images, from the disk cache when these images went
    through this tower before. `tower`: its fingerprint when the caller has it."""
    tower = tower or vision_fingerprint(vlm)
    key = content_key("vision-features", tower, list(images.shape), hashlib.sha256(images.tobytes()).hexdigest())

    def compute() -> dict[str, torch.Tensor]:
        pooled, spatial = [], []
        for i in range(0, len(images), batch_size):
            p, s = vlm.image_features(vlm.encode_stem(images[i : i + batch_size]))
            pooled.append(p)
            spatial.append(s)
        return {"pooled": torch.cat(pooled), "spatial": torch.cat(spatial)}

    found = cached("vision-features", key, compute)
    return found["pooled"], found["spatial"]


def question_features(vlm: DualEncoder, task: ImageQuestions) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled (Q, F), spatial (Q, S, F)): the features of each question's image, each image through the tower once."""
    tower = vision_fingerprint(vlm)
    pooled, spatial = zip(*(image_features(vlm, part, tower=tower) for part in task.parts))
    rows = torch.tensor(task.images)
    return torch.cat(pooled)[rows], torch.cat(spatial)[rows]


# ----------------------------------------------------------------------------- the modules

@dataclass(frozen=True)
class VisionSpec:
    kind: str
    adapter_len: int = 10      # multimodal-adapter: K prompts per layer
    adapter_layers: int = 8    # multimodal-adapter: the top L layers
    num_queries: int = 8       # bridge: N soft prompts
    width: int = 192           # bridge: D
    blocks: int = 1            # bridge: query blocks
    heads: int = 4             # bridge: attention heads

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"vision module kind {self.kind!r} is not one of {', '.join(KINDS)}")


def build_module(spec: VisionSpec, lm, feature_dim: int, seed: int = 0) -> torch.nn.Module:
    """A fresh module of `spec` for `lm` (the multimodal adapter already attached to it); `lm` frozen."""
    lm.requires_grad_(False)
    c = lm.config.hidden_size
    if spec.kind == "multimodal-adapter":
        return MultimodalAdapter(lm.config.model_type, c, feature_dim, spec.adapter_len, spec.adapter_layers,
                                 seed=seed).attach(lm)
    embed_std = lm.get_input_embeddings().weight.float().std().item()
    return QueryBridge(feature_dim, c, spec.width, spec.num_queries, spec.blocks, spec.heads, embed_std, seed=seed)


def count_for(spec: VisionSpec, hidden_size: int, feature_dim: int) -> int:
    if spec.kind == "multimodal-adapter":
        return MultimodalAdapter.parameter_count(hidden_size, feature_dim, spec.adapter_len, spec.adapter_layers)
    return QueryBridge.parameter_count(feature_dim=feature_dim, hidden_size=hidden_size, width=spec.width,
                                       num_queries=spec.num_queries, blocks=spec.blocks, heads=spec.heads)


def equal_budget(hidden_size: int, feature_dim: int, adapter_len: int = 10, adapter_layers: int = 8,
                 num_queries: int = 8, blocks: int = 1, heads: int = 4) -> dict[str, VisionSpec]:
    """The multimodal adapter of (K, L) and the bridge whose width gives the parameter count nearest it."""
    adapter = VisionSpec("multimodal-adapter", adapter_len=adapter_len, adapter_layers=adapter_layers)
    budget = count_for(adapter, hidden_size, feature_dim)
    width = width_for_budget(budget, multiple=4 * heads, feature_dim=feature_dim, hidden_size=hidden_size,
                             num_queries=num_queries, blocks=blocks, heads=heads)
    return {"multimodal-adapter": adapter,
            "bridge": VisionSpec("bridge", num_queries=num_queries, width=width, blocks=blocks, heads=heads)}


def image_inputs(lm, module, pooled: torch.Tensor, spatial: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor):
    """(inputs_embeds, attention_mask, context) of token batches about these images: the bridge's soft prompts
    prepended to the token embeddings (mask extended), or the multimodal adapter's `seeing` context."""
    embeds = lm.get_input_embeddings()(input_ids)  # (B, T, C)
    if isinstance(module, QueryBridge):
        soft = module(spatial).to(embeds.dtype)  # (B, N, C)
        ones = attention_mask.new_ones(soft.shape[:2])
        return torch.cat([soft, embeds], 1), torch.cat([ones, attention_mask], 1), nullcontext()
    return embeds, attention_mask, module.seeing(pooled)


def answer_loss(lm, module, input_ids, attention_mask, labels, pooled, spatial) -> torch.Tensor:
    """Mean NLL of the answer tokens (labels != -100), the LM's output layer applied only where one is predicted."""
    embeds, mask, context = image_inputs(lm, module, pooled, spatial, input_ids, attention_mask)
    if embeds.shape[1] > labels.shape[1]:  # the bridge's soft prompts: nothing to predict there
        labels = torch.cat([labels.new_full((labels.shape[0], embeds.shape[1] - labels.shape[1]), -100), labels], 1)
    with context:
        hidden = lm.base_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state  # (B, L, C)
    follows = labels[:, 1:] != -100  # (B, L - 1): position j predicts token j + 1
    logits = lm.get_output_embeddings()(hidden[:, :-1][follows])  # (n, V)
    return F.cross_entropy(logits.float(), labels[:, 1:][follows])


# ----------------------------------------------------------------------------- training and answering

def question_prompt(tokenizer, question: str = QUESTION, chat: bool = False) -> str:
    """What the LM reads after the image: "Question: ...\nAnswer:", or the question as the chat template's user turn."""
    return prompt_text(Example(question, "", "", (), ""), tokenizer, chat=True) if chat else PLAIN.format(question)


class SeeingRun(AdapterRun):
    """A training run of a vision module: AdapterRun's record, whose `model` is the module (the LM stays bare)."""

    @property
    def module(self) -> torch.nn.Module:
        return self.model


def train_seeing(lm, tokenizer, spec: VisionSpec, pooled: torch.Tensor, spatial: torch.Tensor,
                 answers: list[str] | tuple[str, ...], settings: TrainSettings = TrainSettings(),
                 questions: str | list[str] | tuple[str, ...] = QUESTION) -> SeeingRun:
    """Build `spec`'s module for the frozen `lm` and train it to answer questions[i] (one string: the same question
    for all) about image i (features pooled[i], spatial[i]) with answers[i], for `settings.steps` steps."""
    questions = [questions] * len(answers) if isinstance(questions, str) else list(questions)
    if not len(answers) or not len(answers) == len(questions) == len(pooled) == len(spatial):
        raise ConfigError(f"{len(answers)} answers to {len(questions)} questions for {len(pooled)} pooled and "
                          f"{len(spatial)} spatial features")
    lr = settings.lr if settings.lr is not None else DEFAULT_LR[spec.kind]
    module = build_module(spec, lm, pooled.shape[-1], seed=settings.seed)
    params = [q for q in module.parameters() if q.requires_grad]
    prompts = {q: question_prompt(tokenizer, q, settings.chat) for q in set(questions)}
    targets = [" " + a + (tokenizer.eos_token or "") for a in answers]  # after "Answer:" (chat: after the turn's "\n")
    run = SeeingRun(module, spec, settings, sum(q.numel() for q in params), 0)

    def loss_of(idx: list[int]) -> torch.Tensor:
        batch = target_batch(tokenizer, [prompts[questions[i]] for i in idx], [targets[i] for i in idx])
        return answer_loss(lm, module, batch.input_ids, batch.attention_mask, batch.labels, pooled[idx], spatial[idx])

    run_steps(run, module, params, lr, settings, len(answers), loss_of, spec.kind)
    run.patch_bytes = len(save(module_state(module)))
    return run


def module_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


@torch.no_grad()
def answer_images(lm, tokenizer, module, pooled: torch.Tensor, spatial: torch.Tensor, question: str = QUESTION,
                  chat: bool = False, max_new_tokens: int = 8, batch_size: int = 32,
                  warn: Callable[[str], None] | None = None) -> list[str]:
    """The greedy answers to `question` about each image (one per row of pooled / spatial). A question longer than
    the model's context (less the soft prompts and the answer) keeps its last tokens, and `warn` says so."""
    ids = tokenizer(question_prompt(tokenizer, question, chat), add_special_tokens=False,
                    return_tensors="pt")["input_ids"]  # (1, T)
    limit = context_length(lm)
    if limit is not None:
        room = limit - max_new_tokens - (module.config["num_queries"] if isinstance(module, QueryBridge) else 0)
        if room < 1:
            raise ConfigError(f"--max-new-tokens {max_new_tokens} leaves no room for the question: the model reads "
                              f"{limit} tokens at once")
        if ids.shape[1] > room:
            (warn or _warn)(f"the question is {ids.shape[1]} tokens, longer than the model's context ({limit} tokens, "
                            f"{limit - room} of them for the image and the answer): cut from the left to its last {room}")
            ids = ids[:, -room:]
    out = []
    for start in range(0, len(pooled), batch_size):
        p, s = pooled[start : start + batch_size], spatial[start : start + batch_size]
        input_ids = ids.expand(len(p), -1)
        embeds, mask, context = image_inputs(lm, module, p, s, input_ids, torch.ones_like(input_ids))
        with context:
            new = lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                              do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return out


def score_answers(predictions: list[str], answers: tuple[str, ...] | list[str]) -> dict[str, float]:
    """Exact match and contains (metrics.instructions) of the greedy answers, means over the images. An answer that
    SQuAD's normalisation empties (the letter "A", dropped as an article, which would match any empty answer) is
    compared without it: the first line's words, punctuation dropped and case kept, are exactly it / include it."""
    def scores(p: str, a: str) -> tuple[float, float]:
        if normalize(a):
            return exact_match(p, (a,)), contains(p, (a,))
        words = "".join(" " if ch in string.punctuation else ch for ch in first_line(p)).split()
        return float(words == [a]), float(a in words)

    pairs = [scores(p, a) for p, a in zip(predictions, answers, strict=True)]
    return {"exact_match": sum(e for e, _ in pairs) / len(pairs), "contains": sum(c for _, c in pairs) / len(pairs)}


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


# ----------------------------------------------------------------------------- one file per trained module

def save_vision_module(path: str | Path, run_or_module, kind: str, lm, lm_name: str, vision: ModelConfig,
                       tower: str, chat: bool, questions: tuple[str, ...] | list[str] = (QUESTION,)) -> Path:
    """The module's tensors as safetensors (no pickle), with what loading it needs in the metadata, and the
    questions it was trained to answer."""
    module = getattr(run_or_module, "module", run_or_module)
    meta = {"format": FORMAT, "kind": kind, "config": json.dumps(module.config), "chat": json.dumps(chat),
            "questions": json.dumps(list(questions)), "lm": lm_name, "lm_sha256": lm_fingerprint(lm),
            "vision": json.dumps({"name": vision.name, "resolution": vision.resolution}), "vision_sha256": tower}
    return atomic_write_bytes(Path(path), save(module_state(module), meta))


def is_vision_module(path: str | Path) -> bool:
    """Whether `path` is a file `save_vision_module` wrote (a peft adapter is a folder)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except (SafetensorError, OSError, ValueError):
        return False


def load_vision_module(path: str | Path, lm, lm_name: str) -> tuple[torch.nn.Module, dict]:
    """(module, metadata) of a saved module, on `lm` (the multimodal adapter attached to it); refused, naming both
    fingerprints, when it was trained on another LM."""
    path = Path(path)
    if not is_vision_module(path):
        raise ConfigError(f"--adapter {path} is not a vision module file (save_vision_module writes one) nor a peft "
                          "adapter folder")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    found = lm_fingerprint(lm)
    if meta["lm_sha256"] != found:
        raise ConfigError(f"the vision module {path} was built for another base model: {meta['lm']!r} (SHA-256 "
                          f"{meta['lm_sha256'][:12]}), not for {lm_name} (SHA-256 {found[:12]})")
    config = json.loads(meta["config"])
    lm.requires_grad_(False)
    if meta["kind"] == "multimodal-adapter":
        module = MultimodalAdapter(**config).attach(lm)
    else:
        module = QueryBridge(**config)
    module.load_state_dict(tensors)
    module.requires_grad_(False).eval()
    meta["chat"], meta["vision"] = json.loads(meta["chat"]), json.loads(meta["vision"])
    meta["questions"] = json.loads(meta["questions"]) if "questions" in meta else [meta.get("question", QUESTION)]
    return module, meta


def open_image(path: str | Path) -> Image.Image:
    """The decoded image at `path` (`--image`); one clear error when it is no file or not an image."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--image {path}: no such file")
    try:
        im = Image.open(path)
        im.load()  # decodes the pixels and closes the file (one frame)
        return im
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ConfigError(f"--image {path} is not an image ({type(e).__name__}: {e})") from None


def read_image(path: str | Path) -> np.ndarray:
    """(1, H, W, 3) uint8 RGB of an image file (transparency composited on white); a clear error when it is not one."""
    rgba = open_image(path).convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))[None]


def answer_about_image(lm, tokenizer, module_file: str | Path, image: str | Path, question: str, lm_name: str,
                       max_new_tokens: int = 32, warn: Callable[[str], None] | None = None) -> str:
    """What `lifelong chat --adapter FILE --image PATH` prints: the greedy answer to `question` about the image."""
    pixels = read_image(image)
    module, meta = load_vision_module(module_file, lm, lm_name)
    vision = meta["vision"]
    vlm = build_vlm(ModelConfig(name=vision["name"], resolution=vision["resolution"]))
    tower = vision_fingerprint(vlm)
    if tower != meta["vision_sha256"]:
        raise ConfigError(f"the vision module {module_file} was trained on another image tower: {vision['name']!r} "
                          f"(SHA-256 {meta['vision_sha256'][:12]}), not the installed one (SHA-256 {tower[:12]})")
    pooled, spatial = vlm.image_features(vlm.encode_stem(pixels))
    return answer_images(lm, tokenizer, module, pooled, spatial, question, chat=meta["chat"],
                         max_new_tokens=max_new_tokens, batch_size=1, warn=warn)[0]
