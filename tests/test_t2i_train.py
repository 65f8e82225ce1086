"""The text-to-image training script: exact resume, learning on a fixed batch, and the held-out caption pools.

scripts/train_t2i.py is not part of the package, so it is imported by path. Training runs use the tiny
UNet (diffusion_arch.tiny_unet_config) on a tiny synthetic pool with random "caption states", so no text
encoder is loaded; the pool tests read the real captioned data (skipped when the Debian packages are absent).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from lifelong.errors import DataNotFoundError
from lifelong.families import diffusion_arch as arch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_t2i.py"


@pytest.fixture(scope="module")
def t2i():
    spec = importlib.util.spec_from_file_location("train_t2i", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _tiny_data(t2i):
    return t2i.synthetic_tiny_data()


def tiny_dim() -> int:
    return arch.tiny_unet_config()["cross_attention_dim"]


def _config(t2i, steps=6):
    return dict(t2i.DEFAULT_CONFIG, total_steps=steps, batch_size=4, warmup_steps=2, precision="fp32",
                unet=arch.tiny_unet_config())


QUIET = {"log_with": "none", "sample_every": 0, "progress": False, "log_every": 2}


def test_resume_is_bit_identical(t2i, tmp_path):
    data = _tiny_data(t2i)
    config = _config(t2i)
    options = t2i.RunOptions(**QUIET)
    assert t2i.train(config, tmp_path / "straight", data=data, options=options) == 6

    resumed = tmp_path / "resumed"
    assert t2i.train(config, resumed, stop_after=2, data=data, options=options) == 2  # "killed" after 2 steps
    assert t2i.train(config, resumed, stop_after=3, data=data, options=options) == 5
    assert t2i.train(config, resumed, data=data, options=options) == 6

    a = load_file(tmp_path / "straight" / t2i.CHECKPOINT)
    b = load_file(resumed / t2i.CHECKPOINT)
    assert a.keys() == b.keys()
    assert any(k.startswith("adam.") for k in a) and any(k.startswith("ema.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    final = load_file(resumed / t2i.FINAL)
    assert all(v.dtype == torch.float16 for v in final.values())

    changed = dict(config, lr=1e-3)
    with pytest.raises(Exception, match="different config"):
        t2i.train(changed, resumed, data=data, options=options)


def test_a_resumed_run_may_switch_precision_or_its_length_and_logs_it(t2i, tmp_path):
    """bf16 is emulated (about 50x slower) on a CPU without AVX512-BF16: a run moved there goes on in fp32."""
    data = _tiny_data(t2i)
    options = t2i.RunOptions(**QUIET)
    AcceleratorState._reset_state(True)  # each run as its own process: accelerate fixes the precision per process
    assert t2i.train(dict(_config(t2i), precision="bf16"), tmp_path, stop_after=1, data=data, options=options) == 1
    AcceleratorState._reset_state(True)
    assert t2i.train(_config(t2i), tmp_path, stop_after=1, data=data, options=options) == 2
    events = [json.loads(line) for line in (tmp_path / "train.log").read_text().splitlines()]
    assert {"step": 1, "event": "precision_changed", "checkpoint": "bf16", "now": "fp32"} in events
    # cut short (not below the steps done): trains to the new end, its learning rate on the new schedule
    with pytest.raises(Exception, match="already trained 2 steps"):
        t2i.train(dict(_config(t2i), total_steps=1), tmp_path, data=data, options=options)
    assert t2i.train(dict(_config(t2i), total_steps=3), tmp_path, data=data, options=options) == 3
    assert (tmp_path / t2i.FINAL).is_file()


def test_training_lowers_the_loss_on_a_fixed_batch(t2i):
    data = _tiny_data(t2i)
    config = _config(t2i)
    torch.manual_seed(0)
    model = arch.build_unet(config["unet"])
    alphas = arch.build_noise_scheduler().alphas_cumprod
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = t2i.step_batch(data, config, step=0)

    def step() -> float:
        loss = t2i.diffusion_loss(model, alphas, data, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    first = step()
    for _ in range(8):  # overfit a little
        step()
    before = t2i.diffusion_loss(model, alphas, data, batch).item()
    step()
    after = t2i.diffusion_loss(model, alphas, data, batch).item()
    assert after < before < first


def test_per_step_draws_depend_only_on_seed_and_step(t2i):
    data = _tiny_data(t2i)
    config = _config(t2i)
    for a, b in zip(t2i.step_batch(data, config, 3), t2i.step_batch(data, config, 3)):
        assert torch.equal(a, b)
    assert not torch.equal(t2i.step_batch(data, config, 3)[1], t2i.step_batch(data, config, 4)[1])


def test_heldout_captions_never_train():
    from lifelong.data import captioned

    concepts = captioned.training_concepts()
    train = {c for concept in concepts for c in captioned.train_captions(concept)}
    for concept in concepts:
        held = captioned.heldout_captions(concept)
        assert held, concept.name
        assert not train & set(held), concept.name
    for subject in captioned.HELDOUT_SUBJECTS:
        for concept in captioned.heldout_subject_concepts(subject):
            assert concept.name not in {c.name for c in concepts}


def test_heldout_font_and_category_are_not_in_the_train_pool():
    from lifelong.data import captioned

    train_fonts = {f for _, _, fonts in captioned.FONT_STYLES.values() for f in fonts}
    assert not train_fonts & set(captioned.HELDOUT_FONT_STYLE[3])
    assert captioned.HELDOUT_CLIPART[1][0] not in {folder for folder, *_ in captioned.CLIPART_CATEGORIES.values()}
    try:
        images, ids, concepts = captioned.load_pool("train")
        held, _, _ = captioned.heldout_subject_pool("bug", "train")
    except DataNotFoundError as e:
        pytest.skip(str(e))
    assert images.shape[1:] == (32, 32, 3) and images.dtype.name == "uint8" and len(ids) == len(images)
    assert {c.kind for c in concepts} == set(captioned.KINDS)
    assert not {c.attribute("style") for c in concepts if c.kind == "letter-style"} & {"gothic"}
    train_rows = {row.tobytes() for row in images}
    assert not any(row.tobytes() in train_rows for row in held)


def test_real_text_encoder_states():
    try:
        states, mask = arch.encode_prompts(["", "a photo of a sneaker"])
    except DataNotFoundError as e:
        pytest.skip(str(e))
    assert states.shape == (2, arch.MAX_TOKENS, arch.TEXT_DIM) and mask.shape == (2, arch.MAX_TOKENS)
    assert mask[0].sum() == 2 and mask[1].sum() > 2  # "" is [CLS] [SEP] only
    unet = arch.build_unet(arch.EMBEDDED_UNET_CONFIG)
    assert 4e6 < sum(p.numel() for p in unet.parameters()) < 5e6


def test_two_processes_train_like_one(tmp_path):
    """`accelerate launch --num_processes 2` (DDP over gloo on the CPU): each process trains on half of every
    global batch, the averaged gradient is the full batch's, so the weights agree with one process's to float
    rounding (Adam turns rounding-level differences into small steps: compared as the relative difference
    of the whole update, as tests/test_ddp.py does)."""
    import os
    import subprocess

    bin_dir = Path(sys.executable).parent
    args = [str(SCRIPT), "--synthetic-tiny", "--steps", "4", "--batch-size", "4", "--warmup", "1", "--precision", "fp32",
            "--log-with", "none", "--sample-every", "0", "--no-progress", "--log-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        launch = ([str(bin_dir / "accelerate"), "launch", "--multi_gpu", f"--num_processes={n}", "--num_machines=1",
                   "--mixed_precision=no", "--dynamo_backend=no", "--main_process_port=0"] if n > 1
                  else [sys.executable])
        done = subprocess.run([*launch, *args, "--out-dir", str(out)], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[n] = {k: v.float() for k, v in load_file(out / "checkpoint.safetensors").items() if k.startswith("model.")}
        log = [json.loads(line) for line in (out / "train.log").read_text().splitlines()]
        assert {(r["processes"], r["items_per_process"]) for r in log} == {(n, 4 // n)}  # each trained on its share
    torch.manual_seed(0)  # the script seeds the UNet's initialisation with --seed (0)
    start = {k: v.float() for k, v in arch.build_unet(arch.tiny_unet_config()).state_dict().items()}
    u1 = torch.cat([(runs[1][k] - start[k.removeprefix("model.")]).flatten() for k in runs[1]])
    u2 = torch.cat([(runs[2][k] - start[k.removeprefix("model.")]).flatten() for k in runs[1]])
    assert u1.norm() > 0
    assert float((u2 - u1).norm() / u1.norm()) < 0.05
