"""The diagonal Fisher information, per-sample, without materialising a per-sample backward pass.

    F_i = 1/N sum_n sum_c w_nc (d log p(c | x_n) / d theta_i)^2

with w_nc = p_theta(c | x_n) (the exact Fisher: the expectation over y under the model) or w_nc = 1 for
the true class only (the empirical Fisher). Two implementations give the same numbers (tests compare
them to a per-sample loop):

- `closed_form` (used whenever it covers every trainable image-side parameter): one forward pass per
  chunk of samples, then per class one backward pass to the outputs of the trainable layers, with the
  cotangent sqrt(w_nc) (e_c - p_n) on the logits (the gradient of sqrt(w_nc) log p(c | x_n)). The
  towers run in inference mode, so samples do not interact and every layer's per-sample weight
  gradient has a closed form in its input a_n and output gradient d_n (BackPACK's "BatchGrad",
  Dangel et al., ICLR 2020):

      Linear          G_n = d_n^T a_n               (summed over a sequence axis when there is one)
      Conv2d          G_n = d_n unfold(a_n)^T       per group (depthwise: one group per channel)
      BatchNorm (eval) gamma: sum_s d_n a^_n, beta: sum_s d_n  (a^ the input normalised by the running stats)
      LayerNorm       gamma: sum_t d_n a^_n, beta: sum_t d_n

  and F accumulates sum_n G_n^2. A Linear layer without a sequence axis needs no G_n at all:
  sum_n (d_n a_n^T)^2 = (d^2)^T (a^2).
- `vmap` (the fallback for any other trainable parameter): torch.func vmap over grad of log p(c | x_n),
  per sample and class.

The class side (a dual encoder's text projection, a classifier's head rows) reaches the logits only
through the class embeddings E (C, D): its per-sample gradients are vector-Jacobian products of the
per-sample dlog p / dE, batched in one backward pass (`is_grads_batched`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

SUPPORTED = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm)


def diagonal_fisher(model, inputs: torch.Tensor, targets: torch.Tensor, class_names: tuple[str, ...],
                    mode: str = "exact", chunk: int = 32, method: str = "auto") -> dict[str, torch.Tensor]:
    """Mean over samples of w-weighted squared per-sample log-likelihood gradients, for every trainable
    parameter. `method`: "auto" (closed form where it covers the model, else vmap), "closed_form", "vmap"."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    text_names = [n for n in trainable if n.startswith(model.class_side_prefixes)]
    image_names = [n for n in trainable if n not in text_names]
    layers = closed_form_layers(model, image_names)
    if method == "auto":
        method = "closed_form" if layers is not None else "vmap"
    if method == "closed_form" and layers is None:
        raise ValueError("the closed-form Fisher does not cover this model's trainable parameters; use method='vmap'")
    fisher = {n: torch.zeros_like(p) for n, p in trainable.items()}
    class_emb = model.class_embeddings(class_names)  # (C, D), once, with the graph to the class-side parameters
    per_sample = _closed_form_chunk if method == "closed_form" else _vmap_chunk
    for i in range(0, len(inputs), chunk):
        x, y = inputs[i : i + chunk], targets[i : i + chunk]
        for g_emb, w in per_sample(model, layers, image_names, fisher, class_emb, x, y, mode):
            if text_names:  # g_emb: (B, C, D) per-sample dlog p / dE, already scaled by sqrt(w)
                g_text = torch.autograd.grad(class_emb, [trainable[n] for n in text_names], grad_outputs=g_emb,
                                             is_grads_batched=True, retain_graph=True, allow_unused=True)
                for n, g in zip(text_names, g_text):
                    if g is not None:
                        fisher[n] += torch.einsum("b,b...->...", w, g.pow(2))
    return {n: f / len(inputs) for n, f in fisher.items()}


def _class_weights(model, class_emb, x, y, mode):
    """[(class index per sample (B,), weight per sample (B,))] over which F sums."""
    if mode == "empirical":
        return [(y, torch.ones(len(x)))]
    with torch.no_grad():
        probs = F.softmax(model(x, class_emb.detach()), dim=-1)  # (B, C)
    return [(torch.full((len(x),), c), probs[:, c]) for c in range(class_emb.shape[0])]


# -- vmap ------------------------------------------------------------------------------------------
def _vmap_chunk(model, _layers, image_names, fisher, class_emb, x, y, mode):
    trainable = dict(model.named_parameters())
    image = {n: trainable[n].detach() for n in image_names}
    frozen = {n: p.detach() for n, p in trainable.items() if n not in image}
    buffers = dict(model.named_buffers())

    def log_prob(p, emb, xi, yi):
        logits = functional_call(model, (p, frozen, buffers), (xi.unsqueeze(0), emb))  # (1, C)
        return F.log_softmax(logits, dim=-1)[0].gather(0, yi.unsqueeze(0)).squeeze(0)

    per_sample_grad = vmap(grad(log_prob, argnums=(0, 1)), in_dims=(None, None, 0, 0))
    for c, w in _class_weights(model, class_emb, x, y, mode):
        g_image, g_emb = per_sample_grad(image, class_emb.detach(), x, c)
        for n, g in g_image.items():
            fisher[n] += torch.einsum("b,b...->...", w, g.pow(2))
        yield g_emb, w


# -- closed form -----------------------------------------------------------------------------------
def closed_form_layers(model, image_names: list[str]) -> dict[str, nn.Module] | None:
    """{module name: module} of the layers holding the trainable image-side parameters, or None when
    one of them is outside a supported layer (or a BatchNorm uses batch statistics)."""
    owners, covered = {}, set()
    for mname, module in model.named_modules():
        own = [f"{mname}.{pn}" if mname else pn for pn, p in module.named_parameters(recurse=False) if p.requires_grad]
        own = [n for n in own if n in image_names]
        if not own:
            continue
        if not isinstance(module, SUPPORTED) or (isinstance(module, nn.BatchNorm2d) and (module.training or module.running_mean is None)):
            return None
        owners[mname] = module
        covered.update(own)
    return owners if covered == set(image_names) else None


def _closed_form_chunk(model, layers, _image_names, fisher, class_emb, x, y, mode):
    records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in layers}

    def capture(name):
        def hook(module, args, output):
            records[name].append((args[0].detach(), output))
        return hook

    handles = [m.register_forward_hook(capture(name)) for name, m in layers.items()]
    emb = class_emb.detach().requires_grad_(True)
    try:
        with torch.enable_grad():
            logits = model(x, emb)  # (B, C)
    finally:
        for h in handles:
            h.remove()
    outputs = [out for name in layers for _, out in records[name]]
    # what does not depend on the class (unfolded and normalised inputs, input pair products), once
    weights = _class_weights(model, class_emb, x, y, mode)
    accumulators = {name: LayerFisher(module, [a for a, _ in records[name]], len(weights)) for name, module in layers.items()}
    probs = F.softmax(logits.detach(), dim=-1)
    B = len(x)
    for c, w in weights:
        # d sqrt(w_n) log p(c_n | x_n) / d logits_n = sqrt(w_n) (e_{c_n} - p_n)
        cot = w.sqrt().unsqueeze(1) * (F.one_hot(c, logits.shape[1]).to(probs.dtype) - probs)
        grads = iter(torch.autograd.grad(logits, outputs, grad_outputs=cot, retain_graph=True) if outputs else ())
        for name in layers:
            accumulators[name].add([next(grads) for _ in records[name]])
        # per-sample dlog p / dE for the class side: the logits' vjp w.r.t. E, one sample per batch entry
        eye = torch.zeros(B, *cot.shape)
        eye[torch.arange(B), torch.arange(B)] = cot
        g_emb = torch.autograd.grad(logits, emb, grad_outputs=eye, is_grads_batched=True, retain_graph=True)[0]
        yield g_emb, torch.ones(B)  # the sqrt(w) weighting is already inside g_emb
    for name, acc in accumulators.items():
        for pname, f in acc.finish().items():
            fisher[f"{name}.{pname}" if name else pname] += f


class LayerFisher:
    """sum over samples and classes of squared per-sample gradients of one layer's parameters, for one
    chunk: built from the layer's inputs, then fed the output gradients of every class.

    Weights of a Linear layer or an ungrouped convolution: G_nc = D_nc A_n^T, with D_nc (out, L) the
    output gradient for class c and A_n (in, L) the (unfolded) input over L positions. Expanding the
    square, sum_c G_nc^2 [o, i] = sum_{s,t} M_n[o, s, t] A_n[i, s] A_n[i, t] with the Gram matrices
    M_n[o] = sum_c D_nc[o]^T D_nc[o] (L x L): one batched matmul for the Gram matrices and one matmul
    over (n, s, t) per chunk, instead of forming and squaring B x C per-sample gradients. Used while
    L <= MAX_POSITIONS and the layer runs once per forward pass (a Linear without a sequence axis has
    L = 1: (sum_c D^2)^T (A^2), always the cheaper way) and, for L > 1, there are at least MIN_CLASSES
    output gradients per sample; otherwise, and for grouped convolutions, whose per-channel products
    are cheap, the G_nc are formed and squared.
    """

    MAX_POSITIONS = 16  # a 4 x 4 feature map
    MIN_CLASSES = 3  # with fewer output gradients per sample (and L > 1), forming the G_nc is cheaper

    def __init__(self, module: nn.Module, inputs: list[torch.Tensor], n_classes: int):
        self.module = module
        self.trains = {n for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        self.sums: dict[str, torch.Tensor] = {}
        self.q, self.deltas = None, []
        dense = isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)
        if "weight" in self.trains and dense and len(inputs) == 1:
            cols = _columns(module, inputs[0])  # (B, in, L)
            L = cols.shape[-1]
            if L == 1 or (L <= self.MAX_POSITIONS and n_classes >= self.MIN_CLASSES):
                self.q = torch.einsum("bis,bit->bsti", cols, cols).reshape(-1, cols.shape[1])  # (B L L, in)
        self.rest = self.trains - ({"weight"} if self.q is not None else set())
        self.pre = [_precompute(module, a, self.rest) for a in inputs] if self.rest else None

    def add(self, deltas: list[torch.Tensor]) -> None:
        if self.q is not None:
            self.deltas.append(_columns_out(self.module, deltas[0]))  # (B, out, L)
        if self.pre is None:
            return
        per_sample: dict[str, torch.Tensor] = {}
        for pre, d in zip(self.pre, deltas):
            for pname, g in _sample_grads(self.module, pre, d, self.rest).items():
                per_sample[pname] = per_sample[pname] + g if pname in per_sample else g
        for pname, g in per_sample.items():
            f = g.pow(2).sum(0)
            self.sums[pname] = self.sums[pname] + f if pname in self.sums else f

    def finish(self) -> dict[str, torch.Tensor]:
        out = dict(self.sums)
        if self.deltas:
            d = torch.stack(self.deltas, dim=2)  # (B, out, C, L)
            B, c_out, C, L = d.shape
            d = d.permute(1, 0, 2, 3).reshape(c_out * B, C, L)
            gram = torch.bmm(d.transpose(1, 2), d).view(c_out, B * L * L)  # M_n[o], rows (n, s, t) as in q
            out["weight"] = (gram @ self.q).view_as(self.module.weight)
        return out


def _columns(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """(B, in, L): a Linear layer's input over its L positions (1 without a sequence axis), or a
    convolution's unfolded input (in = in_channels * kh * kw), a package's static padding applied first."""
    if isinstance(module, nn.Linear):
        return a.unsqueeze(-1) if a.dim() == 2 else a.reshape(a.shape[0], -1, a.shape[-1]).transpose(1, 2)
    pad = getattr(module, "static_padding", None)
    if pad is not None:
        a = pad(a)
    if module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding == (0, 0):
        return a.reshape(a.shape[0], a.shape[1], -1)
    return F.unfold(a.contiguous(), module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)


def _columns_out(module: nn.Module, d: torch.Tensor) -> torch.Tensor:
    """(B, out, L): an output gradient laid out as `_columns` lays out the input."""
    if isinstance(module, nn.Linear):
        return d.unsqueeze(-1) if d.dim() == 2 else d.reshape(d.shape[0], -1, d.shape[-1]).transpose(1, 2)
    return d.reshape(d.shape[0], d.shape[1], -1)


def _precompute(module: nn.Module, a: torch.Tensor, trains: set[str]):
    """What the per-sample gradients need of one input, computed once per chunk."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return _columns(module, a) if "weight" in trains else None
    if isinstance(module, nn.BatchNorm2d):  # inference mode: normalised by the running statistics
        return (a - module.running_mean.view(1, -1, 1, 1)) * torch.rsqrt(module.running_var.view(1, -1, 1, 1) + module.eps)
    dims = tuple(range(a.dim() - len(module.normalized_shape), a.dim()))  # LayerNorm
    return (a - a.mean(dims, keepdim=True)) * torch.rsqrt(a.var(dims, unbiased=False, keepdim=True) + module.eps)


def _sample_grads(module: nn.Module, pre, d: torch.Tensor, trains: set[str]) -> dict[str, torch.Tensor]:
    """{parameter name: (B, *param.shape)} per-sample gradients of one call of `module`, from its
    precomputed input `pre` and its output gradient `d`."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        d_cols = _columns_out(module, d)  # (B, out, L)
        if "weight" in trains:
            G = module.groups if isinstance(module, nn.Conv2d) else 1
            B, c_out = d_cols.shape[:2]
            dg, cols = d_cols.view(B, G, c_out // G, -1), pre.view(B, G, pre.shape[1] // G, -1)
            g = torch.bmm(dg[:, 0], cols[:, 0].transpose(1, 2)) if G == 1 else torch.einsum("bgol,bgil->bgoi", dg, cols)
            out["weight"] = g.reshape(B, *module.weight.shape)
        if "bias" in trains:
            out["bias"] = d_cols.sum(-1)
    else:  # BatchNorm2d, LayerNorm: gamma scales the normalised input, beta shifts it
        lead = (2, 3) if isinstance(module, nn.BatchNorm2d) else tuple(range(1, d.dim() - len(module.normalized_shape)))
        if "weight" in trains:
            out["weight"] = (d * pre).sum(lead) if lead else d * pre
        if "bias" in trains:
            out["bias"] = d.sum(lead) if lead else d
    return out
