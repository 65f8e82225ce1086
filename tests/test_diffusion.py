"""The diffusion family on tiny random models: seeded sampling, training, LoRA, the diffusers export, generate.

Two tiny pipelines (built once per module, copied where a test changes one): tiny-embedded (the embedded
design: pixel space, masked BERT states) and tiny-sd (Stable Diffusion's: VAE latents, CLIP text model).
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import lifelong
from lifelong.cli import main
from lifelong.errors import ConfigError
from lifelong.families import diffusion_arch as arch
from lifelong.families import get_family, ledger_families
from lifelong.families.diffusion import TextToImage, build_pipeline, fingerprint, unet_from_safetensors

TINY = ("tiny-embedded", "tiny-sd")
PROMPTS = ["a red square", "a drawing of a house"]


@pytest.fixture(scope="module")
def pipelines() -> dict[str, TextToImage]:
    return {name: build_pipeline(name) for name in TINY}


def fixed_batch(pipeline: TextToImage):
    """Four fixed 16x16 images (a coloured square each) as clean x0, with their captions' states."""
    images = np.full((4, 16, 16, 3), 255, np.uint8)
    for i in range(4):
        images[i, 2 + i : 10 + i, 3:11, i % 3] = 0
    return pipeline.encode_images(images), pipeline.encode([PROMPTS[i % 2] for i in range(4)])


def train_step(pipeline: TextToImage, lr: float = 1e-2) -> tuple[float, float]:
    """One Adam step on the trainable parameters; the loss on one fixed batch, noise and timesteps before and after."""
    x0, states = fixed_batch(pipeline)
    params = [p for p in pipeline.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    pipeline.unet.train()
    loss = pipeline.denoising_loss(x0, states, torch.Generator().manual_seed(0))
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = pipeline.denoising_loss(x0, states, torch.Generator().manual_seed(0))
    return loss.item(), after.item()


@pytest.mark.parametrize("name", TINY)
def test_sampling_is_seeded(pipelines, name):
    pipeline = pipelines[name]
    a = pipeline.sample(PROMPTS, n=2, seed=0, steps=3)
    assert a.shape == (4, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, pipeline.sample(PROMPTS, n=2, seed=0, steps=3))
    assert not np.array_equal(a, pipeline.sample(PROMPTS, n=2, seed=1, steps=3))
    # batching changes nothing but float rounding: the starting noise is drawn for all images first
    assert np.abs(a.astype(int) - pipeline.sample(PROMPTS, n=2, seed=0, steps=3, batch_size=1)).max() <= 1


@pytest.mark.parametrize("name", TINY)
def test_one_training_step_lowers_the_loss(pipelines, name):
    before, after = train_step(copy.deepcopy(pipelines[name]), lr=1e-3)
    assert after < before


def test_encode_keeps_fixed_prompts_and_recomputes_while_the_text_encoder_trains(pipelines):
    pipeline = copy.deepcopy(pipelines["tiny-sd"])
    pipeline.clear_cache()
    calls = []
    pipeline.text_encoder.register_forward_hook(lambda module, args, out: calls.append(1))
    first = pipeline.encode(PROMPTS)
    assert torch.equal(pipeline.encode(PROMPTS[::-1]).hidden, first.hidden.flip(0)) and len(calls) == 1
    pipeline.token_embeddings().weight.requires_grad_(True)  # as Textual Inversion would
    trained = pipeline.encode(PROMPTS)
    assert trained.hidden.requires_grad and len(calls) == 2
    assert pipeline.token_embeddings() is pipeline.text_encoder.get_input_embeddings()


@pytest.mark.parametrize("name", TINY)
def test_cross_attention_kv_are_the_text_side_projections(pipelines, name):
    pipeline = pipelines[name]
    kv = pipeline.cross_attention_kv()
    text_dim = pipeline.text_encoder.config.hidden_size
    assert kv and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in kv)
    assert all(isinstance(m, torch.nn.Linear) and m.in_features == text_dim for m in kv.values())


def test_add_lora_trains_only_lora_parameters(pipelines):
    pipeline = copy.deepcopy(pipelines["tiny-sd"])
    pipeline.add_lora(rank=2, alpha=2.0)
    trainable = {n for n, p in pipeline.unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(p.requires_grad for p in pipeline.text_encoder.parameters())
    base = {n: p.detach().clone() for n, p in pipeline.unet.named_parameters()}
    x0, states = fixed_batch(pipeline)
    x_t, t = x0 + 0.5, torch.tensor([500] * 4)
    with torch.no_grad():
        output = pipeline.noise_prediction(x_t, t, states)
    train_step(pipeline)
    changed = {n for n, p in pipeline.unet.named_parameters() if not torch.equal(p, base[n])}
    assert changed and changed <= trainable
    with torch.no_grad():  # B moved off zero: the adapter is no longer a no-op
        assert not torch.allclose(pipeline.noise_prediction(x_t, t, states), output)
    assert pipeline.cross_attention_kv()  # still found, under the LoRA wrappers
    with pytest.raises(ConfigError, match="match no UNet module"):
        copy.deepcopy(pipelines["tiny-sd"]).add_lora(targets=("q_proj",))


# StableDiffusionPipeline warns that the pixel-space model's DDIM config (clip_sample on, steps_offset 0) is not SD's
@pytest.mark.filterwarnings("ignore:The configuration file of this scheduler:FutureWarning")
@pytest.mark.parametrize("name", TINY)
def test_the_export_loads_in_diffusers_with_identical_predictions(pipelines, name, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipeline = copy.deepcopy(pipelines[name])
    if name == "tiny-sd":  # a LoRA-tuned model exports merged (W + BA: the same function up to float rounding)
        pipeline.add_lora(rank=2)
        train_step(pipeline)
    out = pipeline.export(tmp_path / "export")
    x0, states = fixed_batch(pipeline)
    x_t, t = x0 + 0.5, torch.tensor([10, 300, 600, 900])
    with torch.no_grad():
        expected = pipeline.noise_prediction(x_t, t, states)
        unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
        unet.set_attn_processor(type(pipeline.unet.attn_processors[next(iter(unet.attn_processors))])())
        output = unet(x_t, t, encoder_hidden_states=states.hidden, encoder_attention_mask=states.mask).sample
        assert torch.equal(output, expected) if name == "tiny-embedded" else torch.allclose(output, expected, atol=1e-6)
        loaded = StableDiffusionPipeline.from_pretrained(out, **({"vae": None} if pipeline.vae is None else {}))
        assert torch.allclose(loaded.unet(x_t, t, encoder_hidden_states=states.hidden,
                                          encoder_attention_mask=states.mask).sample, expected, atol=1e-5)
    again = build_pipeline(str(out))
    assert again.text_attention_mask == pipeline.text_attention_mask and again.guidance == pipeline.guidance
    assert again.scheduler.config.clip_sample == pipeline.scheduler.config.clip_sample
    assert np.abs(again.sample(PROMPTS, steps=3).astype(int) - pipeline.sample(PROMPTS, steps=3)).max() <= 1
    if name == "tiny-embedded":
        assert fingerprint(again) == fingerprint(pipeline)
    else:  # diffusers' own pipeline samples it
        assert loaded("a red square", num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 3)


def test_a_train_t2i_checkpoint_loads_with_its_ema_weights(tmp_path):
    spec = importlib.util.spec_from_file_location("train_t2i", Path(__file__).parents[1] / "scripts" / "train_t2i.py")
    t2i = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = t2i  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(t2i)
    config = dict(t2i.DEFAULT_CONFIG, unet=arch.tiny_unet_config())
    torch.manual_seed(0)
    model = arch.build_unet(config["unet"])
    ema = {k: v + 0.01 for k, v in model.state_dict().items()}
    t2i.save_checkpoint(tmp_path / "checkpoint.safetensors", model, ema, torch.optim.AdamW(model.parameters()),
                        3, config, 1.0, "digest")
    t2i.save_final(tmp_path / "final.safetensors", ema, config, 3)
    for file, tolerance in (("checkpoint.safetensors", 0), ("final.safetensors", 1e-3)):
        state = unet_from_safetensors(tmp_path / file).state_dict()
        assert all(torch.allclose(state[k], ema[k], atol=tolerance, rtol=tolerance) for k in ema)
    save_file(ema, tmp_path / "other.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ConfigError, match="is not a checkpoint of scripts/train_t2i.py"):
        unet_from_safetensors(tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match="is not a readable safetensors file"):
        unet_from_safetensors(tmp_path / "broken.safetensors")


def test_the_family_is_registered_for_generation_erasure_and_personalization():
    family = get_family("diffusion")
    assert family.operations == frozenset({"generate", "erase", "personalize"}) and family.probe_kind == "images-generated"
    assert "diffusion" in ledger_families()
    model, tokenizer = family.build(family.tiny())
    assert isinstance(model, TextToImage) and tokenizer is model.tokenizer
    assert family.fingerprint(model) == fingerprint(build_pipeline("tiny-embedded"))


def test_generate_writes_the_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["generate", "--prompt", "a red square", "-n", "5", "--steps", "2", "--model", "tiny-embedded",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "5 image(s)" in captured.out and "denoising" in captured.err  # the progress bar
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 16, 3 * 16, 3)  # 5 images: 3 columns, 2 rows, the last cell black
    images, path = lifelong.generate("a red square", n=5, steps=2, model="tiny-embedded", out=tmp_path / "again.png")
    assert path == tmp_path / "again.png" and np.array_equal(images[4], grid[16:, 16:32])
    assert not grid[16:, 32:].any()


@pytest.mark.parametrize("args, message", [
    (["--prompt", " "], "the prompt is empty"),
    (["--prompt", "a cat", "--steps", "0"], "--steps 0"),
    (["--prompt", "a cat", "--guidance", "-1"], "--guidance -1.0"),
    (["--prompt", "a cat", "-n", "0"], "-n 0"),
    (["--prompt", "a cat", "--model", "lifelong-tests/no-such-pipeline"], "pass the folder: --model DIR"),
    (["--prompt", "a cat", "--model", "{tmp}"], "is not a diffusers pipeline folder"),
    (["--prompt", "a cat", "--model", "{tmp}/weights.safetensors"], "no such file"),
])
def test_bad_input_is_one_message_and_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "grid.png"
    argv = ["generate", "--model", "tiny-embedded", *[a.format(tmp=tmp_path) for a in args], "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "error: " in err and "Traceback" not in err
    assert not out.exists()


def test_embedded_without_weights_says_how_to_finish_the_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("lifelong.families.diffusion.EMBEDDED_ASSET", tmp_path / "none.safetensors")
    assert main(["generate", "--prompt", "a cat"]) == 2
    err = capsys.readouterr().err
    assert "still being trained by scripts/train_t2i.py" in err and "resumes from its checkpoint" in err


@pytest.mark.slow
def test_the_embedded_model_reads_and_samples_as_train_t2i_does():
    """The real model: its text states equal diffusion_arch's, which train_t2i.py trains on."""
    from lifelong.families.diffusion import EMBEDDED_ASSET, embedded

    runs = Path(__file__).parents[1] / "checkpoints" / "t2i"
    weights = (EMBEDDED_ASSET, runs / "final_ema_fp16.safetensors", runs / "checkpoint.safetensors")
    found = [p for p in weights if p.is_file()]
    if not found:
        pytest.skip("no text-to-image weights yet: scripts/train_t2i.py writes them")
    pipeline = embedded(found[0])
    (states, mask), (empty, empty_mask) = arch.encode_prompts(PROMPTS), arch.encode_prompts([""])
    encoded = pipeline.encode(PROMPTS)
    assert torch.equal(encoded.hidden, states) and torch.equal(encoded.mask, mask)
    empty_encoded = pipeline.encode([""])
    assert torch.equal(empty_encoded.hidden, empty) and torch.equal(empty_encoded.mask, empty_mask)


def test_ancestral_sampling_is_seeded_and_independent_of_the_batch_size():
    """eta > 0 draws noise at every step: all of it comes from the seed, so the images do not depend on
    how they are batched, and differ from deterministic DDIM's."""
    pipeline = build_pipeline("tiny-embedded")
    a = pipeline.sample(["a sneaker", "a dress"], n=3, seed=5, steps=4, eta=1.0, batch_size=6)
    b = pipeline.sample(["a sneaker", "a dress"], n=3, seed=5, steps=4, eta=1.0, batch_size=2)
    c = pipeline.sample(["a sneaker", "a dress"], n=3, seed=5, steps=4, eta=0.0, batch_size=6)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1 and not np.array_equal(a, c)
    with pytest.raises(ConfigError, match="eta"):
        pipeline.sample(["a sneaker"], eta=1.5)


def test_the_default_sampler_steps_as_ddpm_ancestral_sampling():
    """DEFAULT_ETA (1) with the noise re-derived from the clipped x0 is DDPM's ancestral step on the same
    timesteps (posterior mean from the clipped x0, variance fixed_small): `denoise` from the same x and step
    noise lands where DDPMScheduler.step lands with a generator that draws that noise."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from lifelong.families.diffusion import DEFAULT_ETA, TextStates

    pipeline = build_pipeline("tiny-embedded")
    assert DEFAULT_ETA == 1.0
    ddim = DDIMScheduler.from_config(pipeline.scheduler.config)
    ddpm = DDPMScheduler.from_config(pipeline.scheduler.config)
    ddim.set_timesteps(5)
    ddpm.set_timesteps(5)
    assert torch.equal(ddim.timesteps, ddpm.timesteps)
    states, empty = pipeline.encode(["a sneaker"] * 2), pipeline.encode([""])
    x = 3 * torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(0))  # x0 predictions outside [-1, 1]: clipping matters
    step_noise = torch.randn((2, 2, 3, 16, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = pipeline.denoise(x, states, empty, ddim, ddim.timesteps[:2], 3.0, eta=DEFAULT_ETA, step_noise=step_noise)
        theirs, both = x, TextStates.cat([empty[[0, 0]], states])
        for i, t in enumerate(ddpm.timesteps[:2]):
            uncond, text = pipeline.noise_prediction(torch.cat([theirs, theirs]), t, both).chunk(2)
            guided = uncond + 3.0 * (text - uncond)
            step = ddpm.step(guided, t, theirs, generator=torch.Generator().manual_seed(7)).prev_sample
            drawn = torch.randn(theirs.shape, generator=torch.Generator().manual_seed(7))  # the noise DDPM added
            sigma = ddpm._get_variance(t, ddpm.previous_timestep(t)) ** 0.5
            theirs = step + sigma * (step_noise[i] - drawn)  # with our step noise in its place
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
