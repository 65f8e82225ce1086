"""Attacks on erased models (erase/attacks.py) on tiny pipelines: each runs, is seeded, lowers its own loss on
a fixed batch, and gives prompts the bench can sample; the simplex projection and the text-encoder hook are
checked against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lifelong.erase.attacks import (
    PLACEHOLDER,
    AttackPrompt,
    adversarial_prompt_attack,
    encode_ids,
    project_simplex,
    textual_inversion_attack,
)
from lifelong.families.diffusion import tiny_embedded, tiny_sd


@pytest.fixture(scope="module")
def images():
    """Real images of one concept (the attack's input): 16 Fashion-MNIST sneakers, uint8 (16, 32, 32, 3)."""
    from lifelong.data import captioned

    return captioned.concept_images(["object/sneaker"], "train", per_concept=16)[0]


@pytest.mark.parametrize("build", [tiny_embedded, tiny_sd])
def test_textual_inversion_attack_is_seeded_and_lowers_its_loss(build, images):
    """The loss is checked on the embedded design; on the SD-shaped tiny model (a random causal CLIP over
    single characters, 16 positions) the token barely moves the prediction and the fixed-batch loss goes
    either way with the draw of batches."""
    model = build()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    runs = [textual_inversion_attack(model, images, steps=30, seed=1, lr=5e-2, batch_size=4) for _ in range(2)]
    a = runs[0]
    assert torch.equal(a.vectors, runs[1].vectors) and a.stats == runs[1].stats
    if build is tiny_embedded:
        assert a.stats["loss_end"] < a.stats["loss_start"]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "the attack changed the model"
    assert all(p.grad is None for p in model.parameters()), "the attack left gradients on the model"
    assert a.text == (PLACEHOLDER, f"a photo of a {PLACEHOLDER}") and a.vectors.shape[0] == 1
    samples = a.sample(model, n=2, seed=0, steps=2)
    assert samples.shape[0] == 4 and samples.dtype == np.uint8
    assert np.array_equal(samples, a.sample(model, n=2, seed=0, steps=2))
    # another attack with a seed of its own learns another embedding
    assert not torch.equal(textual_inversion_attack(model, images, steps=30, seed=2, lr=5e-2, batch_size=4).vectors, a.vectors)


def test_the_learned_embedding_is_what_the_text_encoder_reads(images):
    """encode_ids puts vectors[id - vocab] where the id is past the vocabulary: with the vector of an existing
    token, the states equal those of the prompt written with that token."""
    model = tiny_embedded()
    vocab = len(model.tokenizer)
    real = model.tokenizer(["a red square"], padding="max_length", max_length=16, return_tensors="pt")
    ids = real["input_ids"].clone()
    red = int(ids[0, 2])
    ids[0, 2] = vocab  # the learned slot
    vector = model.token_embeddings().weight[red].detach().unsqueeze(0)
    states = encode_ids(model, ids, real["attention_mask"], vector, vocab)
    assert torch.allclose(states.hidden, model.encode(["a red square"]).hidden, atol=1e-6)
    other = torch.randn(vector.shape, generator=torch.Generator().manual_seed(0))  # (a constant shift: LayerNorm undoes it)
    assert not torch.allclose(encode_ids(model, ids, real["attention_mask"], other, vocab).hidden, states.hidden)


@pytest.mark.parametrize("build", [tiny_embedded, tiny_sd])
def test_adversarial_prompt_attack_is_seeded_and_lowers_its_loss(build, images):
    """On the SD-shaped tiny model (a random 2-layer causal CLIP over single characters) a few discrete tokens
    hardly move the prediction, and the argmax prompt's loss goes either way from seed to seed: its loss is
    checked on the embedded design (masked BERT states), where every seed tried lowers it."""
    model = build()
    runs = [adversarial_prompt_attack(model, None, images, "a sneaker", steps=24, seed=0, tokens=3, iterations=8)
            for _ in range(2)]
    a = runs[0]
    assert torch.equal(a.input_ids, runs[1].input_ids) and a.stats == runs[1].stats
    assert a.stats["steps"] == 24
    if build is tiny_embedded:
        assert a.stats["loss_end"] < a.stats["loss_start"]
    vocab = len(model.tokenizer)
    assert int(a.input_ids.max()) < vocab and a.vectors.numel() == 0  # real tokens: a prompt anyone can type
    assert a.sample(model, n=2, seed=0, steps=2).shape[0] == 2


def test_adversarial_prompt_attack_stops_when_told_and_compares_with_the_original(images):
    model, original = tiny_embedded(), tiny_embedded()
    seen = []

    def stop(prompt: AttackPrompt) -> bool:
        seen.append(prompt.text)
        return len(seen) == 2

    a = adversarial_prompt_attack(model, original, images, "a sneaker", steps=40, seed=0, iterations=5,
                                  target="original", stop=stop)
    assert a.stats["stopped"] == 1 and a.stats["steps"] == 10 and len(seen) == 2


def test_project_simplex_is_the_euclidean_projection():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(4, 7, generator=g)
    p = project_simplex(u)
    assert torch.allclose(p.sum(-1), torch.ones(4)) and (p >= 0).all()
    for _ in range(200):  # no other point of the simplex is closer
        q = torch.distributions.Dirichlet(torch.ones(7)).sample((4,))
        assert ((u - p) ** 2).sum(-1).le(((u - q) ** 2).sum(-1) + 1e-6).all()
    on = torch.tensor([[0.2, 0.3, 0.5]])
    assert torch.allclose(project_simplex(on), on)
