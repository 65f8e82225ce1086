"""VPT (modules/vpt.py) on the tiny CLIP built from a config: the prompted trunk is the paper's equation
written out, only the prompts train, shallow/deep sizes, a ledger change that learns and reverts bit for bit,
and the refusals (a CNN tower, prompts in the text tower, prompt dropout)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lifelong.cli import main
from lifelong.config import AdapterConfig, MethodConfig, ModelConfig
from lifelong.families import prepare_trainable
from lifelong.families.vlm import build_vlm, model_fingerprint
from lifelong.learn import build_method
from lifelong.ledger.core import Ledger
from lifelong.loop import compute_stem_features, run_stream
from lifelong.metrics.cost import count_parameters
from lifelong.modules.vpt import count_prompt_parameters

CLIP = ModelConfig(name="tiny-clip", trainable_blocks=3)  # every layer in the trunk: the paper's VPT
K, D, L, P = 4, 32, 3, 16  # prompt tokens; the tiny CLIP's width, depth and patch count (32 px / 8 px patches)


@pytest.fixture(scope="module")
def clip_base():
    return build_vlm(CLIP)


@pytest.fixture
def clip(clip_base):
    return copy.deepcopy(clip_base)


def prompted(model, deep: bool, tokens: int = K):
    prepare_trainable(model, CLIP, AdapterConfig(kind="vpt", prompt_tokens=tokens, deep_prompts=deep), seed=0)
    return model


def layer_inputs(model, h):
    """The hidden states entering each trunk layer (forward pre-hooks), and the trunk's output."""
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
             for layer in model.image_trunk.layers]
    out = model.image_trunk(h)
    for hook in hooks:
        hook.remove()
    return seen, out


def reference_vpt(model, h, prompts: torch.Tensor):
    """The paper's equations written out on the CLIP vision encoder itself: [CLS, P_0, patches] into layer 0;
    deep: layer i's input is [x_{i-1}, P_i, E_{i-1}] (the previous prompt outputs dropped)."""
    vision = model.native["clip"].vision_model
    n = h.shape[0]
    for i, layer in enumerate(vision.encoder.layers):
        if i == 0:
            h = torch.cat([h[:, :1], prompts[0].expand(n, -1, -1), h[:, 1:]], dim=1)  # (N, 1 + K + P, D)
        elif i < len(prompts):
            h = torch.cat([h[:, :1], prompts[i].expand(n, -1, -1), h[:, 1 + prompts.shape[1]:]], dim=1)
        h = layer(h, None)
    return vision.post_layernorm(h[:, 0])  # (N, D)


@pytest.mark.parametrize("deep", [False, True])
def test_prompted_trunk_is_the_papers_equation(clip, deep):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = clip.image_stem(x)  # (N, 1 + P, D): embeddings + pre-LayerNorm
        plain_inputs, plain = layer_inputs(clip, h)
        prompted(clip, deep)
        prompts = clip.image_trunk.prompts.embeddings
        inputs, out = layer_inputs(clip, h)
        expected = reference_vpt(clip, h, prompts)
    assert h.shape[1] == 1 + P and all(t.shape[1] == 1 + P for t in plain_inputs)
    # The sequence grows by K once, after CLS (which is untouched), and never again (deep replaces).
    assert all(t.shape == (3, 1 + K + P, D) for t in inputs)
    assert torch.equal(inputs[0][:, 0], h[:, 0]) and torch.equal(inputs[0][:, 1 + K:], h[:, 1:])
    for i, t in enumerate(inputs):
        fresh = torch.equal(t[:, 1:1 + K], prompts[i].expand(3, -1, -1)) if i < len(prompts) else False
        assert fresh == (i == 0 or deep), f"layer {i}: prompts fresh={fresh}"
    assert torch.equal(out, expected)
    assert not torch.allclose(out, plain)  # the CLS output moved, through attention to the prompts alone
    # Init: the official uniform [-v, v], v = sqrt(6 / (3 * patch^2 + D)).
    v = (6 / (3 * 8 * 8 + D)) ** 0.5
    assert prompts.abs().max() <= v and prompts.abs().max() > 0.9 * v
    # Taken off, the trunk is the plain one bit for bit.
    clip.image_trunk.prompts = None
    with torch.no_grad():
        assert torch.equal(clip.image_trunk(h), plain)


def test_shallow_and_deep_parameter_counts(clip_base):
    for deep, expected in ((False, K * D), (True, L * K * D)):
        model = prompted(copy.deepcopy(clip_base), deep)
        trainable, _ = count_parameters(model)
        assert trainable == expected == count_prompt_parameters(L, K, D, deep)
        assert [n for n, p in model.named_parameters() if p.requires_grad] == ["image_trunk.prompts.embeddings"]


@pytest.fixture(scope="module")
def clip_stem(tiny_stream, clip_base):
    return compute_stem_features(clip_base, tiny_stream, 64)


def test_only_the_prompts_train(clip, tiny_stream, clip_stem, tiny_config):
    before = {n: p.detach().clone() for n, p in clip.named_parameters()}
    prompted(clip, deep=True)
    start = clip.image_trunk.prompts.embeddings.detach().clone()
    for name in ("finetune", "lwf", "ewc"):  # three methods of the adapter mode, 4 steps on each task
        run_stream(clip, build_method(MethodConfig(name=name)), tiny_stream, clip_stem, tiny_config, checkpoint_dir=None)
    after = dict(clip.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before), "a frozen parameter moved"
    assert not torch.equal(after["image_trunk.prompts.embeddings"], start)


def cli(*args) -> int:
    return main([str(a) for a in args])


INIT = ["--model", "tiny-clip", "--trainable-blocks", "3", "--probe", "lfw", "--probe-items", "20"]
TRAIN = ["train.batch_size=16", "train.log_with=none"]


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def accuracy(model, x, y, class_emb) -> float:
    with torch.no_grad():
        return (model(x, class_emb).argmax(-1) == y).float().mean().item() * 100


def test_vpt_learns_its_task(clip, tiny_stream, clip_stem):
    """A random tower's image embeddings are nearly collapsed (mean pairwise cosine 0.99 on mnist), which
    input-independent prompts cannot undo (deep VPT on the random tiny CLIP: lfw held-out 50 -> 30%, digits
    10 -> 15%; they learn to flatten the logits). So the tower first gets features from full fine-tuning on
    mnist; deep VPT on lfw then fits its task: training accuracy well above zero-shot, the loss down."""
    def fit(model, t: int, lr: float, steps: int) -> tuple[float, float, list[float]]:
        x, y = clip_stem.train[t], torch.as_tensor(tiny_stream.tasks[t].train.labels)
        class_emb = model.class_embeddings(tiny_stream.tasks[t].class_names).detach()
        zero_shot = accuracy(model, x, y, class_emb)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        g, losses = torch.Generator().manual_seed(0), []
        for _ in range(steps):
            i = torch.randint(0, len(x), (16,), generator=g)
            loss = F.cross_entropy(model(x[i], class_emb), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return zero_shot, accuracy(model, x, y, class_emb), losses

    prepare_trainable(clip, CLIP, AdapterConfig())  # full fine-tuning of the trunk on mnist (task 3)
    fit(clip, 2, 1e-3, 60)
    prompted(clip, deep=True, tokens=10)
    zero_shot, trained, losses = fit(clip, 1, 1e-2, 60)  # lfw
    print(f"lfw training accuracy: zero-shot {zero_shot:.1f}%, after deep VPT {trained:.1f}%")
    assert trained >= zero_shot + 20, (zero_shot, trained)
    assert sum(losses[-10:]) < sum(losses[:10])


def test_a_vpt_change_is_recorded_and_reverts_bit_for_bit(tmp_path):
    root = tmp_path / "ledger"
    assert cli("init", root, *INIT) == 0
    assert cli("learn", root, "--task", "mnist", "--train-items", "40", "--test-items", "20", *TRAIN,
               "train.steps_per_task=20", "train.lr=1e-3") == 0
    assert cli("learn", root, "--task", "lfw", "--train-items", "40", "--test-items", "20", *TRAIN,
               "train.steps_per_task=20", "train.lr=1e-2", "adapter.kind=vpt", "adapter.deep_prompts=true",
               "adapter.prompt_tokens=10") == 0
    ledger = Ledger.open(root)
    change = ledger.change(2)
    assert change["cost"]["trainable_params"] == L * 10 * D
    patch = ledger.patch(2)
    assert set(patch) == {"prompts::image_trunk", "prompts_before::image_trunk"}
    assert patch["prompts::image_trunk"].shape == (L, 10, D) and patch["prompts_before::image_trunk"].numel() == 0
    now = ledger.materialize()
    assert torch.equal(now.image_trunk.prompts.embeddings, patch["prompts::image_trunk"])
    assert cli("export", root, tmp_path / "out") == 2  # a CLIPModel folder cannot hold prompts

    assert cli("revert", root, 2) == 0
    ledger = Ledger.open(root)
    assert ledger.changes[-1]["strategy"] == "subtract"
    reverted, before = ledger.materialize(), ledger.materialize(upto=1)
    assert reverted.image_trunk.prompts is None
    assert params(reverted).keys() == params(before).keys()
    assert all(torch.equal(a, b) for a, b in zip(params(reverted).values(), params(before).values()))
    assert model_fingerprint(reverted) == model_fingerprint(before)
    assert ledger.changes[-1]["probes_after"]["lfw"] == change["probes_before"]["lfw"]


def test_a_second_vpt_change_continues_the_prompts_and_its_revert_restores_them(tmp_path):
    root = tmp_path / "ledger"
    assert cli("init", root, *INIT) == 0
    base = Ledger.open(root).base_model()
    for task in ("lfw", "mnist"):
        assert cli("learn", root, "--task", task, "--train-items", "40", "--test-items", "20", *TRAIN,
                   "train.steps_per_task=3", "adapter.kind=vpt") == 0
    ledger = Ledger.open(root)
    first, second = ledger.patch(1), ledger.patch(2)
    assert torch.equal(second["prompts_before::image_trunk"], first["prompts::image_trunk"])
    assert not torch.equal(second["prompts::image_trunk"], first["prompts::image_trunk"])
    assert cli("learn", root, "--task", "lfw", "--train-items", "40", "--test-items", "20", *TRAIN,
               "train.steps_per_task=3", "adapter.kind=vpt", "adapter.prompt_tokens=7") == 2  # other shape: refused
    assert cli("revert", root, 2) == 0
    assert torch.equal(Ledger.open(root).materialize().image_trunk.prompts.embeddings, first["prompts::image_trunk"])
    assert cli("revert", root, 1) == 0
    plain = Ledger.open(root).materialize()
    assert plain.image_trunk.prompts is None and model_fingerprint(plain) == model_fingerprint(base)


def test_refusals(tmp_path, capsys, tiny_model):
    config = tmp_path / "vpt.yaml"
    config.write_text("name: vpt\nmethods: [finetune]\n")
    run = ["run", config]
    common = ["stream.name=tiny", "train.steps_per_task=1", f"output_dir={tmp_path}", "train.log_with=none"]
    assert cli(*run, "model.name=tiny-embedded", "model.resolution=32", "model.trainable_blocks=2",
               "adapter.kind=vpt", *common) == 2
    err = capsys.readouterr().err
    assert "adapter.kind=vpt" in err and "CNN" in err and "adapter.kind=lora" in err and "CLIP" in err
    assert not (tmp_path / "vpt").exists()  # refused before any work: no run folder, no stem features
    assert cli(*run, "model.name=tiny-clip", "adapter.kind=vpt", "adapter.tower=text", *common) == 2
    assert "image tower only" in capsys.readouterr().err
    assert cli(*run, "model.name=tiny-clip", "adapter.kind=vpt", "adapter.dropout=0.1", *common) == 2
    assert "inference mode" in capsys.readouterr().err
    with pytest.raises(Exception, match="CNN"):
        prepare_trainable(tiny_model, ModelConfig(name="tiny-embedded"), AdapterConfig(kind="vpt"))


def test_vpt_prompts_get_gradients_from_the_loss(clip):
    """A guard against prompts that sit in the sequence but never reach the CLS output."""
    prompted(clip, deep=False)
    h = clip.image_stem(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    loss = F.cross_entropy(clip(h, clip.class_embeddings(("cat", "dog"))), torch.tensor([0, 1]))
    loss.backward()
    assert clip.image_trunk.prompts.embeddings.grad.abs().sum() > 0


def test_moe_adapters_refuses_a_prompted_model(clip):
    """MoE-Adapters freezes the model and trains its own experts: VPT's prompts would silently stay frozen."""
    from lifelong.config import MethodConfig
    from lifelong.errors import ConfigError
    from lifelong.learn import build_method

    method = build_method(MethodConfig(name="moe_adapters"))
    with pytest.raises(ConfigError, match="adapter.kind: none"):
        method.prepare(prompted(clip, deep=False))
