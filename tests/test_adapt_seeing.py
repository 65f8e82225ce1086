"""Seeing (adapt/seeing.py): the multimodal LLaMA-Adapter and the query bridge on tiny models.

The zero-init test alone would pass for a module that ignores the image, so the others open the gates and check
the image changes the output, that with the visual term switched off the adapter is the text-only LLaMA-Adapter
exactly, and that both modules learn a task only the image can answer (and do not when the images are shuffled).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from lifelong.adapt.instruct import TrainSettings
from lifelong.adapt.seeing import (
    QUESTIONS,
    VisionSpec,
    answer_images,
    build_module,
    count_for,
    equal_budget,
    image_questions,
    load_vision_module,
    question_features,
    save_vision_module,
    score_answers,
    train_seeing,
    vision_fingerprint,
)
from lifelong.cli import main
from lifelong.config import ModelConfig
from lifelong.data import captioned
from lifelong.errors import ConfigError
from lifelong.families.lm import tiny_lm
from lifelong.families.vlm import build_vlm
from lifelong.modules.llama_adapter import adaption_parameters, add_llama_adapter

ARCHS = ("llama", "gpt2")
FEATURES = 16
ADAPTER = VisionSpec("multimodal-adapter", adapter_len=4, adapter_layers=2)
BRIDGE = VisionSpec("bridge", width=32, num_queries=4)
LR = {"multimodal-adapter": 3e-2, "bridge": 3e-3}
NAMES = ("Berlin", "Canada", "Africa", "Brazil")  # one token each in the tiny tokenizer, after a space


def inputs(tokenizer):
    return tokenizer(["The capital of France is", "A quick brown fox jumps"], return_tensors="pt", padding=True)


def logits(lm, batch, module=None, features=None):
    with torch.no_grad():
        if module is None:
            return lm(**batch).logits
        with module.seeing(features):
            return lm(**batch).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_multimodal_adapter_starts_exactly_at_the_base_then_sees(arch):
    lm, tok = tiny_lm(arch)
    batch = inputs(tok)
    base = logits(lm, batch)
    adapter = build_module(ADAPTER, lm, FEATURES)
    images = torch.randn(2, FEATURES)
    assert torch.equal(logits(lm, batch, adapter, images), base)  # g_l = 0: bit-identical whatever the image
    with torch.no_grad():
        adapter.gates.fill_(0.7)
    seen = logits(lm, batch, adapter, images)
    assert not torch.allclose(seen, base, atol=1e-4)
    assert not torch.allclose(logits(lm, batch, adapter, torch.randn(2, FEATURES)), seen, atol=1e-4)  # the image counts
    with pytest.raises(RuntimeError, match="has no image"):
        lm(**batch)
    adapter.detach()
    assert torch.equal(logits(lm, batch), base)


@pytest.mark.parametrize("arch", ARCHS)
def test_without_its_visual_term_it_is_the_text_llama_adapter(arch):
    """I_p = 0 (the LayerNorm's affine zeroed): the same prompts and gates give the text-only adapter's logits (peft's
    AdaptedAttention for Llama, modules/llama_adapter.py's GPT-2 hook), so the per-image attention is that equation."""
    lm, tok = tiny_lm(arch)
    batch = inputs(tok)
    adapter = build_module(ADAPTER, lm, FEATURES)
    with torch.no_grad():
        adapter.gates.copy_(torch.tensor([0.5, -0.8]))
        adapter.visual_norm.weight.zero_()
        adapter.visual_norm.bias.zero_()
    ours = logits(lm, batch, adapter, torch.randn(2, FEATURES))
    adapter.detach()
    text = add_llama_adapter(lm, ADAPTER.adapter_len, ADAPTER.adapter_layers)
    with torch.no_grad():
        prompts, gates = iter(adapter.prompts), iter(adapter.gates)
        for name, q in adaption_parameters(text).items():  # in layer order: prompt then gate of each layer
            q.copy_(next(prompts).view_as(q) if name.endswith("prompt") else next(gates).view_as(q))
    torch.testing.assert_close(ours, logits(text, batch), rtol=1e-5, atol=1e-5)


def test_equal_budget_and_counts():
    specs = equal_budget(576, 1280, adapter_len=10, adapter_layers=8, num_queries=8, blocks=1)
    counts = {kind: count_for(spec, 576, 1280) for kind, spec in specs.items()}
    assert counts["multimodal-adapter"] == 8 * (10 * 576 + 1) + 1280 * 576 + 3 * 576
    assert abs(counts["bridge"] / counts["multimodal-adapter"] - 1) < 0.1, counts
    lm, _ = tiny_lm("llama")
    for spec in (ADAPTER, BRIDGE):
        module = build_module(spec, lm, FEATURES)
        assert count_for(spec, 64, FEATURES) == sum(q.numel() for q in module.parameters() if q.requires_grad)
        assert not any(q.requires_grad for q in lm.parameters())


def selective_lm(arch: str):
    """A tiny random LM whose attention can select: at the default init (std 0.02) every query attends almost
    uniformly and each position mostly predicts its own token back, which no input-side soft prompt can overturn;
    at std 0.2 attention picks positions, as in a trained LM."""
    lm, tok = tiny_lm(arch, n_layers=2)
    lm.config.initializer_range = 0.2
    torch.manual_seed(0)
    return (LlamaForCausalLM if arch == "llama" else GPT2LMHeadModel)(lm.config).eval(), tok


def image_task(n: int = 96):
    """Four kinds of "image" (a class centre plus noise, as pooled and spatial features) named by one word each."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(len(NAMES), FEATURES, generator=g) * 2
    labels = torch.randint(0, len(NAMES), (n,), generator=g)
    pooled = centres[labels] + 0.5 * torch.randn(n, FEATURES, generator=g)
    spatial = pooled[:, None, :] + 0.1 * torch.randn(n, 4, FEATURES, generator=g)  # (N, 4 tokens, F)
    return pooled, spatial, [NAMES[i] for i in labels]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", [ADAPTER, BRIDGE], ids=lambda s: s.kind)
def test_learns_what_only_the_image_decides(spec, arch):
    pooled, spatial, answers = image_task()
    settings = TrainSettings(steps=60, batch_size=16, chat=False, lr=LR[spec.kind])
    scores = {}
    for blind in (False, True):  # the control: every image, in training and test, replaced by one mean image
        p, s = (pooled.mean(0).expand_as(pooled), spatial.mean(0).expand_as(spatial)) if blind else (pooled, spatial)
        lm, tok = selective_lm(arch)
        run = train_seeing(lm, tok, spec, p[:64], s[:64], answers[:64], settings)
        predictions = answer_images(lm, tok, run.module, p[64:], s[64:], max_new_tokens=1)
        scores[blind] = score_answers(predictions, answers[64:])["exact_match"]
    most_common = max(answers[64:].count(name) for name in NAMES) / len(answers[64:])
    assert scores[False] >= 0.9, scores  # measured 0.97-1.0 (chance 0.25)
    assert scores[True] <= most_common, scores  # blind, the best it can do is one answer for all


def test_a_saved_module_answers_the_same_and_only_on_its_model(tmp_path):
    pooled, spatial, answers = image_task(24)
    lm, tok = tiny_lm("llama")
    vision = ModelConfig(name="tiny-embedded", resolution=32)
    for spec in (ADAPTER, BRIDGE):
        run = train_seeing(lm, tok, spec, pooled, spatial, answers, TrainSettings(steps=2, batch_size=8, chat=False))
        before = answer_images(lm, tok, run.module, pooled[:4], spatial[:4], max_new_tokens=3)
        if hasattr(run.module, "detach"):
            run.module.detach()
        file = save_vision_module(tmp_path / f"{spec.kind}.safetensors", run, spec.kind, lm, "tiny-llama", vision,
                                  "0" * 64, chat=False)
        fresh, _ = tiny_lm("llama")
        module, meta = load_vision_module(file, fresh, "tiny-llama")
        assert meta["kind"] == spec.kind and meta["chat"] is False
        assert answer_images(fresh, tok, module, pooled[:4], spatial[:4], max_new_tokens=3) == before
        other, _ = tiny_lm("llama", seed=1)
        with pytest.raises(ConfigError, match="built for another base model: 'tiny-llama' .*SHA-256"):
            load_vision_module(file, other, "another")


@pytest.fixture(scope="module")
def vision_file(tmp_path_factory):
    """A (barely trained) bridge for the tiny Llama that `lifelong chat --model tiny-llama` builds, on the tiny
    embedded image tower."""
    lm, tok = tiny_lm("llama")
    vision = ModelConfig(name="tiny-embedded", resolution=32)
    vlm = build_vlm(vision)
    images = torch.randint(0, 255, (8, 32, 32, 3), dtype=torch.uint8).numpy()
    pooled, spatial = vlm.image_features(vlm.encode_stem(images))
    run = train_seeing(lm, tok, BRIDGE, pooled, spatial, ["Berlin"] * 8, TrainSettings(steps=2, batch_size=4, chat=False))
    return save_vision_module(tmp_path_factory.mktemp("vision") / "bridge.safetensors", run, "bridge", lm,
                              "tiny-llama", vision, vision_fingerprint(vlm), chat=False)


def test_chat_answers_about_an_image_through_a_vision_module(vision_file, tmp_path, capsys):
    picture = tmp_path / "cat.png"
    Image.new("RGBA", (20, 12), (200, 30, 30, 128)).save(picture)
    assert main(["chat", "--model", "tiny-llama", "--adapter", str(vision_file), "--image", str(picture),
                 "--max-new-tokens", "3", "What is shown in this image?"]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("\n") and "Traceback" not in captured.err  # one answer line (barely trained: any text)


def test_chat_image_bad_input(vision_file, tmp_path, capsys):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert main(["chat", "--model", "tiny-llama", "--adapter", str(vision_file), "--image", str(text), "what?"]) == 2
    err = capsys.readouterr().err
    assert "--image" in err and "is not an image (UnidentifiedImageError" in err and "Traceback" not in err
    assert main(["chat", "--model", "tiny-llama", "--adapter", str(vision_file), "--image", str(tmp_path / "no.png"),
                 "what?"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["chat", "--model", "tiny-llama", "--adapter", str(vision_file), "what is this?"]) == 2
    assert "is a vision module: give the image to ask about, --image PATH" in capsys.readouterr().err
    assert main(["chat", "--model", "tiny-gpt2", "--adapter", str(vision_file), "--image", str(text), "what?"]) == 2
    assert "is not an image" in capsys.readouterr().err  # the image is checked before any model loads
    picture = tmp_path / "cat.png"
    Image.new("RGB", (8, 8)).save(picture)
    assert main(["chat", "--model", "tiny-gpt2", "--adapter", str(vision_file), "--image", str(picture), "what?"]) == 2
    assert "was built for another base model: 'tiny-llama'" in capsys.readouterr().err


def two_question_task(n: int = 128):
    """Images with two independent attributes (the sum of one centre of each, plus noise), each asked two questions:
    the first attribute's name (Berlin / Canada) or the second's (Africa / Brazil). Every image is asked both, so a
    module that ignores the question answers one of them wrong on every image."""
    g = torch.Generator().manual_seed(1)
    first, second = torch.randn(2, FEATURES, generator=g) * 2, torch.randn(2, FEATURES, generator=g) * 2
    a, b = torch.randint(0, 2, (n,), generator=g), torch.randint(0, 2, (n,), generator=g)
    pooled = first[a] + second[b] + 0.5 * torch.randn(n, FEATURES, generator=g)
    spatial = pooled[:, None, :] + 0.1 * torch.randn(n, 4, FEATURES, generator=g)  # (N, 4 tokens, F)
    rows = torch.cat([torch.arange(n), torch.arange(n)])  # each image twice: once per question
    questions = [QUESTIONS["colour"]] * n + [QUESTIONS["letter"]] * n
    answers = [NAMES[i] for i in a] + [NAMES[2 + i] for i in b]
    return pooled[rows], spatial[rows], questions, answers


@pytest.mark.parametrize("spec", [ADAPTER, BRIDGE], ids=lambda s: s.kind)
def test_the_question_decides_which_answer(spec):
    pooled, spatial, questions, answers = two_question_task()
    train = [i for i in range(len(answers)) if i % 128 < 96]  # images 0..95 train, 96..127 test, both questions
    lm, tok = selective_lm("llama")
    run = train_seeing(lm, tok, spec, pooled[train], spatial[train], [answers[i] for i in train],
                       TrainSettings(steps=100, batch_size=16, chat=False, lr=LR[spec.kind]),
                       questions=[questions[i] for i in train])
    scores = {}
    for question, test in ((QUESTIONS["colour"], range(96, 128)), (QUESTIONS["letter"], range(224, 256))):
        test = list(test)  # the same 32 held-out images, asked one question or the other
        predictions = answer_images(lm, tok, run.module, pooled[test], spatial[test], question, max_new_tokens=1)
        scores[question] = score_answers(predictions, [answers[i] for i in test])["exact_match"]
    # one answer per image whatever the question would score at most 0.5 on the two together; measured: the adapter
    # 1.0 and 1.0, the bridge 0.875 and 1.0
    assert min(scores.values()) >= 0.8, scores


def test_letter_questions_are_about_real_renders(monkeypatch):
    """The colour and letter questions: data.captioned's renders (fewer per concept here, to stay fast), the colour
    answer the ink the pixels show, the letter answer one of its letters, both asked about the same image with
    different answers, and no test image among the training ones."""
    monkeypatch.setitem(captioned.LETTER_RENDERS, "train", 2)
    monkeypatch.setitem(captioned.LETTER_RENDERS, "test", 1)
    train, test = (image_questions(split, 96, sources=(), counting=False) for split in ("train", "test"))
    for task in (train, test):
        assert set(task.kinds) == {"colour", "letter"} and set(task.sources) == {"letters"}
        assert task.choices == {"colour": tuple(captioned.INK_COLOURS), "letter": captioned.LETTERS}
        colour, letter = task.of_kind("colour"), task.of_kind("letter")
        assert len(colour) == len(letter) == 96
        assert [task.images[i] for i in colour] == [task.images[i] for i in letter]  # the same images, in order
        for i, j in zip(colour, letter):
            assert task.questions[i] != task.questions[j] and task.answers[i] != task.answers[j]
            assert task.answers[j] in captioned.LETTERS
            # the ink: ink over white at coverage c is 255 - c (255 - ink), so 255 - pixel points towards 255 - ink
            dark = 255.0 - task.image(i).reshape(-1, 3).astype(float)
            strongest = dark[np.argmax(np.linalg.norm(dark, axis=1))]
            inks = {name: 255.0 - np.array(rgb) for name, rgb in captioned.INK_COLOURS.items()}
            cosine = {name: strongest @ v / np.linalg.norm(strongest) / np.linalg.norm(v) for name, v in inks.items()}
            assert task.answers[i] == max(cosine, key=cosine.get), (task.answers[i], cosine)
        assert len({task.answers[i] for i in colour}) == 4 and len({task.answers[j] for j in letter}) == 8
    seen = {train.image(i).tobytes() for i in range(len(train))}
    assert not any(test.image(i).tobytes() in seen for i in range(len(test)))
    rendered = {im.tobytes() for im in captioned.letter_pool("test")[0]}
    assert all(test.image(i).tobytes() in rendered for i in range(len(test)))  # captioned's own test split
    vlm = build_vlm(ModelConfig(name="tiny-embedded", resolution=32))
    pooled, _ = question_features(vlm, test)
    torch.testing.assert_close(pooled[test.of_kind("colour")], pooled[test.of_kind("letter")])  # same image features


def test_the_letter_a_is_not_an_article():
    """SQuAD's normalisation drops "A" as an article, so an empty answer would match it: compared unnormalised."""
    assert score_answers(["A", "", "a", "The A.", "B.", "the red"], ["A", "A", "A", "A", "B", "red"]) == {
        "exact_match": 3 / 6, "contains": 4 / 6}


def test_counting_scenes_hold_as_many_real_digits_as_their_answer():
    """Each scene's answer is the number of its 2 x 2 cells that hold ink, the counts are balanced, the digits are
    MNIST's of the same split, and the test scenes are other draws than the training ones."""
    from lifelong.adapt.seeing import NUMBER_WORDS, counting_pool
    from lifelong.data.sources import load_source

    train, _ = counting_pool("train", 16)
    scenes, answers = counting_pool("test", 16)
    assert scenes.shape == (16, 56, 56, 3) and set(answers) == set(NUMBER_WORDS)
    assert all(answers.count(w) == 4 for w in NUMBER_WORDS)
    digits = {d.tobytes() for d in load_source("mnist", "test", invert=True).images}
    for scene, answer in zip(scenes, answers):
        cells = [scene[r:r + 28, c:c + 28] for r in (0, 28) for c in (0, 28)]
        inked = [cell for cell in cells if cell.min() < 128]
        assert len(inked) == NUMBER_WORDS.index(answer) + 1
        assert all(cell.tobytes() in digits for cell in inked)  # a real test digit, pasted whole
        assert all((cell == 255).all() for cell in cells if cell.min() >= 128)  # the rest blank
    assert not {s.tobytes() for s in scenes} & {s.tobytes() for s in train}
    again, _ = counting_pool("test", 16)
    assert np.array_equal(again, scenes)  # seeded
    task = image_questions("test", 8, sources=(), letter_questions=())
    assert set(task.kinds) == {"count"} and task.choices == {"count": NUMBER_WORDS}
    assert task.questions[0] == "How many digits are there?"
