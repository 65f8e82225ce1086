"""What every personalization method shares: the request, the contract, reading a user's images, and the
pieces of the training loops.

A personalizer teaches a text-to-image model (`families.diffusion.TextToImage`) a new subject or style
from a few images, in place:

    Personalizer(params)                    knobs only; nothing is changed yet
    personalize(model, request, seed) -> dict
                                            trains the model in place; returns stats (floats: the loss at
                                            the start and end, steps, trainable parameters)

A method that adds a token (`adds_token = True`: Textual Inversion's placeholder, Custom Diffusion's
modifier token) puts `request.token` into the tokenizer and a new row into the text encoder's token
embeddings (`TextToImage.add_tokens`); one that adds several for one identifier (Mix-of-Show's "<tok1>",
"<tok2>") names them with a `new_tokens(token)` method. The ledger records the rows and the tokens
(ledger/personal.py), besides the patch of the weights it moved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lifelong.data import captioned
from lifelong.errors import ConfigError, DataNotFoundError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MIN_IMAGES = 3  # the papers use 3-5 (DreamBooth, Custom Diffusion) to 3-5 (Textual Inversion) images of a subject
MAX_IMAGES = 20


@dataclass(frozen=True, eq=False)
class PersonalizeRequest:
    """One subject or style to teach.

    images      uint8 (N, S, S, 3) at the model's image size
    token       the identifier the prompts use for the subject ("<my-style>"); a new token for the methods
                that add one, else text written into the prompts as is (DreamBooth's identifier)
    class_word  the subject's class ("letter", "bug"): DreamBooth's and Custom Diffusion's class prompt,
                the initializer of a new token's embedding
    notes       what reading the images did (resized, skipped files), for the record
    """

    images: np.ndarray
    token: str
    class_word: str = ""
    notes: tuple[str, ...] = ()

    @property
    def instance_prompt(self) -> str:
        """The subject's prompt: "a <token> <class>" (DreamBooth's "a [V] [class noun]")."""
        return " ".join(["a", self.token, self.class_word]).strip()

    @property
    def class_prompt(self) -> str:
        """The class prompt without the identifier: "a <class>" (prior preservation, regularization images)."""
        return f"a {self.class_word}" if self.class_word else ""

    def summary(self) -> dict:
        """What a ledger records of the request (the pixels are hashed, not stored)."""
        import hashlib

        return {"token": self.token, "class_word": self.class_word, "n_images": int(len(self.images)),
                "images_sha256": hashlib.sha256(np.ascontiguousarray(self.images).tobytes()).hexdigest(),
                "instance_prompt": self.instance_prompt, "class_prompt": self.class_prompt, "notes": list(self.notes)}


@runtime_checkable
class PersonalizerProtocol(Protocol):
    """The contract of every registered personalizer (tests/test_personalize.py checks each one)."""

    name: ClassVar[str]
    Params: ClassVar[type]
    adds_token: ClassVar[bool]  # True: request.token becomes a new vocabulary token with its own embedding row

    def personalize(self, model, request: PersonalizeRequest, seed: int = 0, progress: bool = False) -> dict[str, float]: ...


def new_tokens(personalizer, token: str) -> list[str]:
    """The vocabulary tokens `personalizer` adds for the identifier `token`: none, the token itself (Textual
    Inversion, Custom Diffusion), or those its own `new_tokens` names (Mix-of-Show's pair "<tok1>", "<tok2>")."""
    if not personalizer.adds_token:
        return []
    own = getattr(personalizer, "new_tokens", None)
    return list(own(token)) if own is not None else [token]


# --- reading a user's folder -------------------------------------------------------------------------------

def read_images(folder: str | Path, size: int, min_images: int = MIN_IMAGES,
                max_images: int = MAX_IMAGES) -> tuple[np.ndarray, tuple[str, ...]]:
    """The images of `folder` (sorted by name, at most `max_images`) as uint8 (N, size, size, 3): each made
    RGB (transparency on white), centre-cropped to a square and resized (Lanczos). Files that do not
    decode are skipped and named in the notes; fewer than `min_images` readable images is an error."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataNotFoundError(f"--images {folder}: no such folder; give a folder of {min_images}-{max_images} "
                                "images of the subject")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images, skipped, sizes = [], [], set()
    for path in files:
        try:
            with Image.open(path) as im:
                im.load()
                sizes.add(im.size)
                images.append(_square(im, size))
        except (UnidentifiedImageError, OSError, ValueError):
            skipped.append(path.name)
        if len(images) == max_images:
            break
    if len(images) < min_images:
        found = f"{len(images)} readable image(s)" + (f" (unreadable: {', '.join(skipped[:5])})" if skipped else "")
        raise DataNotFoundError(f"--images {folder}: {found}; personalizing needs at least {min_images} images of the "
                                f"subject ({', '.join(IMAGE_SUFFIXES)} files)")
    notes = []
    if skipped:
        notes.append(f"skipped {len(skipped)} unreadable file(s): {', '.join(skipped[:5])}")
    if len(sizes) > 1 or sizes != {(size, size)}:
        notes.append(f"resized {len(images)} image(s) of {len(sizes)} size(s) to {size}x{size}")
    return np.stack(images), tuple(notes)


def _square(im: Image.Image, size: int) -> np.ndarray:
    if im.mode in ("RGBA", "LA", "P"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    im = im.convert("RGB")
    w, h = im.size
    side = min(w, h)
    im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    return np.asarray(im.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def check_token(model, token: str, new_token: bool) -> list[str]:
    """Refuse an unusable identifier; return warnings. A method that adds a token needs one the vocabulary
    does not hold yet (a word, or a token an earlier change added). An identifier that names a concept the
    model was trained on (find_concepts) is a warning: its prompts would pull toward that concept."""
    token = token.strip()
    if not token:
        raise ConfigError("the token is empty: give the identifier the prompts will use, e.g. --token '<my-style>'")
    if any(c.isspace() for c in token):
        raise ConfigError(f"--token {token!r}: one word without spaces, e.g. '<my-style>'")
    warnings = []
    vocab = model.tokenizer.get_vocab()
    if new_token and (token in vocab or token.lower() in vocab):
        raise ConfigError(f"--token {token!r} is already in the vocabulary (a word, or a token an earlier "
                          "personalization added): choose a new one, e.g. '<my-style>'")
    known = captioned.find_concepts(token.strip("<>[]{}()").replace("-", " ").replace("_", " "))
    if known:
        names = ", ".join(c.name for c in known[:5]) + (f" and {len(known) - 5} more" if len(known) > 5 else "")
        warnings.append(f"the identifier {token!r} names concepts the model knows ({names}): its prompts will pull "
                        "toward them; a made-up word such as '<my-style>' does not")
    return warnings


# --- the loops' pieces -------------------------------------------------------------------------------------

def image_batch(x0: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """`batch_size` rows of x0 (N, C, h, w) drawn with replacement (seeded)."""
    return x0[torch.randint(len(x0), (batch_size,), generator=generator)]


def class_images(model, prompt: str, n: int, seed: int, steps: int) -> torch.Tensor:
    """x0 of `n` images the model draws from `prompt` before it is changed (DreamBooth's class images, Custom
    Diffusion's generated regularization set): (n, C, h, w)."""
    return model.encode_images(model.sample([prompt], n=n, seed=seed, steps=steps))


def real_class_images(model, class_word: str, n: int, seed: int) -> torch.Tensor | None:
    """x0 of `n` real images of the class (seeded, spread over the concepts it covers) from the data the embedded
    model was trained on (lifelong.data.captioned), the offline stand-in for Custom Diffusion's retrieval of real
    class images (`--real_prior`); None when the data has no such class or the model draws at another size."""
    concepts = captioned.class_concepts(class_word) if class_word else []
    if not concepts or model.image_size != captioned.SIZE:
        return None
    per = max(1, -(-n // len(concepts)))
    images, _ = captioned.concept_images([c.name for c in concepts], "train", per_concept=per, seed=seed)
    order = np.random.default_rng(seed).permutation(len(images))[:n]
    return model.encode_images(images[order])


def freeze_all(model) -> None:
    model.unet.requires_grad_(False)
    model.text_encoder.requires_grad_(False)


def restore_rows(weight: torch.Tensor, original: torch.Tensor, keep: list[int]) -> None:
    """Put every row of the token embedding but `keep` back to `original`: only the new tokens' rows learn
    (the official `index_no_updates` of diffusers' textual_inversion.py). `original` has the rows before."""
    mask = torch.ones(len(weight), dtype=torch.bool)
    mask[keep] = False
    with torch.no_grad():
        weight[mask] = original[mask]


