"""WISE: a routed side memory for lifelong editing (Wang et al. 2024, "WISE: Rethinking the Knowledge
Memory for Lifelong Model Editing of Large Language Models"; EasyEdit's WISE-Merge).

One FFN output projection W (Llama `down_proj`, GPT-2 `c_proj`) gets side copies W' that hold the edits;
W itself never changes. With A(x) the projection's input activations, the activation score of an input
is Delta(x) = mean_t ||A(x_t) (W' - W)^T||_2 and the layer outputs A W'^T (+ bias) when Delta(x) > eps,
else A W^T, with eps = act_ratio * the smallest edit score seen while editing. An edit trains W' by

    W' <- clip_{W +- c}( W' - lr * M * grad_{W'} [ NLL(y_e | x_e)
          + [Delta(x_i) - alpha]_+ + [beta - Delta(x_e)]_+ + [gamma - (Delta(x_e) - Delta(x_i))]_+ ] )

(SGD, M a random 0/1 gradient mask with P(1) = mask_ratio), with x_e the edit prompt + target under
`n_prefixes` context prefixes (greedy continuations of "I", "You", "Because", "Yes", "Q: ", 5 and 10
tokens, as EasyEdit) and x_i a fixed memory of unrelated sentences (IRRELEVANT_TEXTS). Knowledge
sharding: each shard of `shard_size` edits trains a fresh copy W' = W under its own mask; once
`num_shards` shards are done their deltas are merged by TIES (trim each to its top-`density`
magnitudes, elect the sign of the summed deltas, average the entries that agree) into the side memory.

Defaults, and why: the paper's margins alpha, beta, gamma = 5, 20, 10 suit SmolLM2 as they are (at
layer 25 its down-projection output has norm ~95 per token, so a score of 20 is a ~20% change);
EasyEdit's mask ratio 0.2, norm constraint 1.0, act_ratio 0.88, 70 steps, 500 edits per shard, 2 shards
and TIES density 0.53. `layer` None = 85% depth (EasyEdit edits layer 27 of LLaMA-2-7B's 32):
SmolLM2-135M -> layer 25 of 30. Scale-downs for SmolLM2 on a CPU: lr 0.1 (EasyEdit 1.0: on SmolLM2 that
saturates the norm constraint within a few steps, edit and unrelated scores reach 78 and 51, and
"The capital of Germany is" is routed to " Lyon" too; at 0.1 the scores settle near 26 and 5 and it keeps
" Berlin"), and 5 context prefixes instead of 10 (a training step's cost grows with the rows; 5 keep
the paraphrase "The capital city of France is" edited). lr 0.1 stays after a sweep on train-split
questions (scripts/tune_wise.py, docs/wise_tuning.json; T = 10 sequential edits, token level): at
0.1 an edit is under-fitted (its routed target NLL ends at 1.1-5.8 from 7-13, all 70 steps used;
routing is not at fault: every edit prompt scores above the threshold) and
Rel/Gen/Loc are .30/.28/.97; lr 0.5 / 1.0 fit each edit (NLL 0.11-0.75 / 0.001-0.56 right after it) but later
edits in the same shard overwrite earlier ones (mean NLL 2.4 / 1.9 after all 10) and the side memory
fires on unrelated prompts too: Rel/Gen .40/.53 and .60/.50 with Loc .95 / .92 and only .76 of 80
extra unrelated probes kept; act_ratio 1.0 keeps .94 of those but Rel/Gen fall to .40/.40 and .45/.38
- no setting was clearly better on 10 edits. Two speed-ups change no number: layers below the
edited one run once per edit (`replay_lower_layers`) and the 49k-way output layer runs only where a
target token is predicted (`target_only_nll`).

Deviations: Delta is the plain L2 norm of the output difference as in the paper (EasyEdit applies the
model's activation function to both outputs first), averaged over non-padding tokens (EasyEdit also
averages padding, and switches to the top token past 100 tokens); routing is decided per sequence
(EasyEdit: one decision per batch; in cached greedy decoding each new token is one such sequence). At inference every side copy holding edits is a candidate - the
merged memory, shards awaiting the merge, the shard in progress - and the one with the largest
Delta is used if it passes eps (EasyEdit's merge mode compares the merged memory and the copy in
training; it merges pending shards only at evaluation time). A later merge treats the previous merged
memory as one more task vector (EasyEdit weights it 0.6 against 0.4 for the new shards). The
irrelevant inputs are a fixed in-file memory, scored from cached activations (W is upstream-frozen,
so A(x_i) never changes); EasyEdit draws one unrelated NQ sentence per edit. No weight decay
(EasyEdit: 1e-5). Early stop once the total loss is below `stop_loss` (EasyEdit: 0.02 and flat).

The side memory is applied by a forward hook on the projection (not a wrapper module), so the model's
parameter names stay those of the plain model; `state_dict` / `load_state_dict` move the whole editor
state (side copies, threshold, shard bookkeeping, the shard's gradient mask and random state, the
context prefixes) to another copy of the model (what an lm ledger records, ledger/edits.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from lifelong.data.edit_requests import EditRequest
from lifelong.edit.base import Editor
from lifelong.families.lm import decoder_layers, ffn_out, frozen, linear_weight, resolve_layer, target_batch

# x_i: ordinary sentences unrelated to any fact request, which must keep Delta below alpha
IRRELEVANT_TEXTS = (
    "The recipe calls for two cups of flour and a pinch of salt.",
    "She walked her dog along the river every morning before work.",
    "The meeting has been moved to Thursday afternoon.",
    "Please remember to turn off the lights when you leave the room.",
    "The children built a sandcastle on the beach.",
    "He fixed the leaking tap in the kitchen with a new washer.",
    "It rained all weekend, so we stayed inside and played cards.",
    "The library closes at eight o'clock on weekdays.",
    "My favourite season is autumn because of the colours of the leaves.",
    "The train was delayed by twenty minutes this morning.",
)
PREFIX_SEEDS = ("I", "You", "Because", "Yes", "Q: ")


@dataclass(frozen=True)
class Params:
    layer: int | None = None     # decoder block whose FFN output projection gets the side memory; None = 85% depth
    lr: float = 0.1              # SGD on the side copy (EasyEdit, for LLaMA-2-7B: 1.0)
    steps: int = 70
    alpha: float = 5.0           # irrelevant inputs: Delta(x_i) below alpha
    beta: float = 20.0           # edit inputs: Delta(x_e) above beta
    gamma: float = 10.0          # and Delta(x_e) - Delta(x_i) above gamma
    act_ratio: float = 0.88      # routing threshold = act_ratio * min edit Delta
    norm_constraint: float = 1.0  # L-inf bound of W' - W
    mask_ratio: float = 0.2      # fraction of W' each shard may change
    shard_size: int = 500        # edits per side copy
    num_shards: int = 2          # side copies merged together by TIES
    density: float = 0.53        # TIES trim: fraction of each delta kept
    n_prefixes: int = 5          # context prefixes added to each edit, 0..10 (EasyEdit: 10)
    stop_loss: float = 0.02
    seed: int = 0                # gradient masks

    def __post_init__(self) -> None:  # checked when the knobs are read, before any model is loaded
        if not 0 < self.mask_ratio <= 1:
            raise ValueError(f"mask_ratio must be in (0, 1], got {self.mask_ratio}")
        if self.shard_size < 1 or self.num_shards < 1:
            raise ValueError(f"shard_size and num_shards must be >= 1, got {self.shard_size}, {self.num_shards}")
        if not 0 <= self.n_prefixes <= 2 * len(PREFIX_SEEDS):
            raise ValueError(f"n_prefixes must be in 0..{2 * len(PREFIX_SEEDS)}, got {self.n_prefixes}")


def ties_merge(base: torch.Tensor, tensors: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES merging (Yadav et al. 2023) of `tensors` onto `base`: trim, elect sign, disjoint mean."""
    deltas = torch.stack([t - base for t in tensors]).flatten(1)      # (k, n)
    keep = max(1, round(density * deltas.shape[1]))
    cutoff = deltas.abs().topk(keep, dim=1).values[:, -1:]            # (k, 1): each delta's own cutoff
    trimmed = torch.where(deltas.abs() >= cutoff, deltas, torch.zeros_like(deltas))
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)                # (n,) elected sign
    agree = (torch.sign(trimmed) == sign).to(deltas.dtype)            # zeros never agree
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)     # (n,) mean of the agreeing
    return base + merged.view_as(base)


def _hinge_mean(v: torch.Tensor) -> torch.Tensor:
    """Mean of the positive entries (EasyEdit's margin terms), 0 when none is positive."""
    pos = v[v > 0]
    return pos.mean() if pos.numel() else v.new_zeros(())


class WiseSideMemory(nn.Module):
    """The projection `main`'s side memory: routes each sequence to the best side copy or to `main`.

    Attached to the projection as a child (`main.wise`) and applied to its output by a forward hook, so
    the model's parameter names stay those of the plain model (a ledger's weight patches still fit)."""

    def __init__(self, main: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "main", main)  # a reference, not a submodule (main holds this module)
        self.side: torch.Tensor | None = None  # merged side memory (out, in)
        self.pending: list[torch.Tensor] = []   # finished shards awaiting the merge
        self.current: torch.Tensor | None = None  # the shard in progress (a leaf while training)
        self.threshold = float("inf")
        self.editing = False  # training: every sequence goes through `current`
        self.record = False   # keep the input (A(x)) in `last_input`
        self.last_input: torch.Tensor | None = None
        self.edit_scores: torch.Tensor | None = None  # (B, T) per-token Delta while editing
        self.attention_mask: torch.Tensor | None = None  # set by the model's pre-hook

    def copies(self) -> list[torch.Tensor]:
        return ([self.side] if self.side is not None else []) + self.pending + \
               ([self.current] if self.current is not None else [])

    def token_mask(self, B: int, T: int, like: torch.Tensor) -> torch.Tensor:
        m = self.attention_mask
        if m is None or m.shape[0] != B or m.shape[1] < T:
            return like.new_ones(B, T)
        return m[:, -T:].to(like.dtype)  # with a KV cache the mask covers past tokens too

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x: the projection's input A (B, T, d_in); out: its own output (B, T, d_out) = A W^T (+ b)."""
        if self.record:
            self.last_input = x.detach()
        if self.editing:
            diff = F.linear(x, self.current - linear_weight(self.main))  # (B, T, d_out) = A (W' - W)^T
            self.edit_scores = diff.norm(dim=-1)  # (B, T)
            return out + diff
        if not self.copies():
            return out
        score, diff = self.route(x)
        routed = (score > self.threshold)[:, None, None]
        return torch.where(routed, out + diff, out)  # unrouted rows: exactly f_0's output

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For inputs A = x (B, T, d_in): the best side copy's score Delta (B,) and its output change
        A (W' - W)^T (B, T, d_out), best = the copy with the largest Delta, per sequence."""
        w = linear_weight(self.main)
        B, T, _ = x.shape
        mask = self.token_mask(B, T, x)                                   # (B, T)
        best_score = x.new_full((B,), -float("inf"))
        best_diff = x.new_zeros(B, T, w.shape[0])
        for copy in self.copies():
            diff = F.linear(x, copy - w)                                  # (B, T, d_out)
            score = (diff.norm(dim=-1) * mask).sum(1) / mask.sum(1).clamp_min(1)  # (B,)
            better = score > best_score
            best_score = torch.where(better, score, best_score)
            best_diff = torch.where(better[:, None, None], diff, best_diff)
        return best_score, best_diff


@contextmanager
def replay_lower_layers(model: nn.Module, layer: int):
    """Inside, each decoder layer below `layer` computes its output once and then returns that same
    output: an edit trains at `layer` on one fixed batch, so everything below it is constant, and a
    training step costs only the layers from `layer` up. Valid only while every forward pass inside
    sees the same inputs (an edit's loop)."""
    blocks = list(decoder_layers(model))[:layer]
    recorded: dict[int, object] = {}
    for i, block in enumerate(blocks):
        def forward(*args, _i=i, _forward=block.forward, **kwargs):
            if _i not in recorded:
                recorded[_i] = _forward(*args, **kwargs)
            return recorded[_i]
        block.forward = forward  # shadows the class's forward until the block ends
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def target_only_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`base.target_nll` (mean target NLL per row, then over rows), with the output layer applied only
    at the positions that predict target tokens: an edit batch of prompts under prefixes is mostly
    prompt, and on SmolLM2 the 49k-way output layer would otherwise cost most of a training step."""
    where = batch.target_mask                                         # (B, T)

    def keep_targets(module, args):
        return (args[0][where],)                                         # (B, T, D) -> (N, D)

    hook = model.get_output_embeddings().register_forward_pre_hook(keep_targets)
    try:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (N, V)
    finally:
        hook.remove()
    targets = batch.labels[:, 1:][where[:, :-1]]                      # (N,) same row-major order
    token_nll = F.cross_entropy(logits.float(), targets, reduction="none")
    rows = where.nonzero()[:, 0]                                         # (N,) row of each target token
    per_row = token_nll.new_zeros(len(where)).index_add(0, rows, token_nll) / where.sum(1)
    return per_row.mean()


class WISE(Editor):
    name = "wise"
    records = "module"  # how a ledger records an edit: the state of the modules it adds
    Params = Params

    def __init__(self, model, tokenizer, params: Params) -> None:
        super().__init__(model, tokenizer, params)
        self.layer = resolve_layer(model, params.layer, 0.85)
        self.original = ffn_out(model, self.layer)
        self.memory: WiseSideMemory | None = None  # installed by the first apply
        self.prefixes: list[str] | None = None      # f_0's greedy continuations, made once
        self.reset()

    # ------------------------------------------------------------------ setup
    def _install(self) -> WiseSideMemory:
        if self.prefixes is None:  # from f_0, before anything is attached
            self.prefixes = self._context_prefixes()
        self.memory = WiseSideMemory(self.original)
        self.original.wise = self.memory
        layer = self.layer

        # the hooks read the module they run on (not self), so a deep copy of the model keeps its own memory
        def keep_mask(model, args, kwargs):  # routing needs to know which tokens are padding
            ffn_out(model, layer).wise.attention_mask = kwargs.get("attention_mask")

        self.hook = self.model.register_forward_pre_hook(keep_mask, with_kwargs=True)
        self.out_hook = self.original.register_forward_hook(lambda m, args, out: m.wise(args[0], out))
        self.irrelevant_acts, self.irrelevant_mask = self._irrelevant_activations()
        return self.memory

    @torch.no_grad()
    def _context_prefixes(self) -> list[str]:
        """EasyEdit's context templates: greedy continuations (5 and 10 tokens) of five seed words."""
        device = self.original.weight.device
        by_length: dict[int, list[list[int]]] = {}  # seeds of equal length share one generate call
        for seed in PREFIX_SEEDS:
            ids = self.tokenizer(seed, add_special_tokens=False)["input_ids"]
            by_length.setdefault(len(ids), []).append(ids)
        continuation = {}
        for length, group in by_length.items():
            ids = torch.tensor(group, device=device)                                # (G, length)
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                      do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
            for seed_ids, row in zip(group, out):
                continuation[tuple(seed_ids)] = row.tolist()
        short, long = [], []
        for seed in PREFIX_SEEDS:  # greedy: the 5-token continuation is the 10-token one's start
            seed_ids = self.tokenizer(seed, add_special_tokens=False)["input_ids"]
            row = continuation[tuple(seed_ids)]
            short.append(self.tokenizer.decode(row[: len(seed_ids) + 5], skip_special_tokens=True))
            long.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return (short + long)[: self.params.n_prefixes]

    @torch.no_grad()
    def _irrelevant_activations(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A(x_i) for the unrelated memory: (N, T, d_in) right-padded, and its (N, T) token mask."""
        acts = []
        self.memory.record = True
        for text in IRRELEVANT_TEXTS:
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            self.model(input_ids=ids.to(self.original.weight.device))
            acts.append(self.memory.last_input[0])  # (T_i, d_in)
        self.memory.record, self.memory.last_input = False, None
        mask = nn.utils.rnn.pad_sequence([a.new_ones(len(a)) for a in acts], batch_first=True)
        return nn.utils.rnn.pad_sequence(acts, batch_first=True), mask

    # ------------------------------------------------------------------ editing
    def apply(self, request: EditRequest) -> dict:
        p = self.params
        mem = self.memory or self._install()
        w = linear_weight(self.original).detach()
        prompts = [request.prompt] + [f"{prefix} {request.prompt}" for prefix in self.prefixes]
        batch = target_batch(self.tokenizer, prompts, [request.target_new] * len(prompts), w.device)
        mask = batch.attention_mask.to(w.dtype)                    # (E, T)

        if mem.current is None:  # a new shard: a fresh copy of W and its own gradient mask
            mem.current = w.clone()
            self.grad_mask = (torch.rand(w.shape, generator=self.generator) < p.mask_ratio).to(w)
        current = mem.current.requires_grad_(True)
        opt = torch.optim.SGD([current], lr=p.lr)

        def scores() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """(target NLL, Delta(x_e) per edit row, Delta(x_i) per unrelated text), W' in use."""
            nll = target_only_nll(self.model, batch)
            edit = (mem.edit_scores * mask).sum(1) / mask.sum(1)                              # (E,)
            per_token = F.linear(self.irrelevant_acts, current - w).norm(dim=-1)              # (N, T)
            irrelevant = (per_token * self.irrelevant_mask).sum(1) / self.irrelevant_mask.sum(1)  # (N,)
            return nll, edit, irrelevant

        steps = 0
        try:
            with frozen(self.model), replay_lower_layers(self.model, self.layer):
                with torch.no_grad():  # routed as at inference; also records the lower layers
                    loss_before = target_only_nll(self.model, batch).item()
                mem.editing = True
                for steps in range(1, p.steps + 1):
                    nll, edit, irrelevant = scores()
                    loss = (nll + _hinge_mean(irrelevant - p.alpha) + _hinge_mean(p.beta - edit)
                            + _hinge_mean(p.gamma - (edit[None, :] - irrelevant[:, None])))
                    if loss.item() < p.stop_loss:
                        steps -= 1
                        break
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    current.grad.mul_(self.grad_mask)  # this shard's subspace only
                    opt.step()
                    with torch.no_grad():
                        current.copy_(torch.clamp(current, w - p.norm_constraint, w + p.norm_constraint))
                with torch.no_grad():
                    nll, edit, irrelevant = scores()
        finally:
            mem.editing, mem.edit_scores = False, None
            current.grad = None
            current.requires_grad_(False)

        # the routing threshold: the smallest edit score seen, times act_ratio
        self.min_edit_score = min(self.min_edit_score, edit.mean().item())
        mem.threshold = p.act_ratio * self.min_edit_score
        self.edits_in_shard += 1
        merged = 0.0
        if self.edits_in_shard == p.shard_size:  # shard full: park it; merge once enough are parked
            mem.pending.append(mem.current.detach())
            mem.current, self.edits_in_shard = None, 0
            if len(mem.pending) == p.num_shards:
                previous = [mem.side] if mem.side is not None else []
                mem.side = ties_merge(w, previous + mem.pending, p.density)
                mem.pending = []
                merged = 1.0
        with torch.no_grad():
            loss_after = target_only_nll(self.model, batch).item()  # with routing, as at inference
        return {"loss_before": loss_before, "loss_after": loss_after, "steps": float(steps),
                "edit_score": edit.mean().item(), "irrelevant_score": irrelevant.max().item(),
                "threshold": mem.threshold, "merged": merged}

    def reset(self) -> None:
        if self.memory is not None:
            self.out_hook.remove()
            self.hook.remove()
            del self.original.wise
            self.memory = None
        self.generator = torch.Generator().manual_seed(self.params.seed)
        self.min_edit_score = float("inf")
        self.edits_in_shard = 0

    # ------------------------------------------------------------------ state (a ledger records it)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything the editor carries from edit to edit: the side copies (merged memory, shards awaiting
        the merge, the shard in progress; each with its memory layout), the routing threshold, the smallest
        edit score, the edits in the current shard, its gradient mask, the mask generator's state, the
        context prefixes (f_0's, made once) and the layer. `load_state_dict` on an editor of a fresh model
        gives a model that answers bit-identically and edits on exactly as this editor would."""
        mem = self.memory
        w = linear_weight(self.original)
        side = [mem.side] if mem is not None and mem.side is not None else []
        pending = list(mem.pending) if mem is not None else []
        current = [mem.current] if mem is not None and mem.current is not None else []

        def stack(copies: list[torch.Tensor]) -> torch.Tensor:  # (n, out, in), row-major on disk
            if not copies:
                return torch.zeros(0, *w.shape, dtype=w.dtype)
            return torch.stack([c.detach().cpu() for c in copies]).contiguous()

        encoded = [prefix.encode() for prefix in (self.prefixes or [])]
        return {
            "layer": torch.tensor(self.layer),
            "side": stack(side),            # (0 or 1, out, in)
            "pending": stack(pending),      # (P, out, in)
            "current": stack(current),      # (0 or 1, out, in)
            # each copy's strides, in copies() order (a copy of a transposed weight keeps its layout)
            "strides": torch.tensor([list(c.stride()) for c in side + pending + current], dtype=torch.long).view(-1, 2),
            "grad_mask": (self.grad_mask.detach().cpu().bool()[None] if current
                          else torch.zeros(0, *w.shape, dtype=torch.bool)),  # the current shard's mask
            "threshold": torch.tensor(mem.threshold if mem is not None else float("inf"), dtype=torch.float64),
            "min_edit_score": torch.tensor(self.min_edit_score, dtype=torch.float64),
            "edits_in_shard": torch.tensor(self.edits_in_shard),
            "generator": self.generator.get_state(),
            "installed": torch.tensor(mem is not None),
            "prefixes": torch.tensor(list(b"".join(encoded)), dtype=torch.uint8),  # utf-8, concatenated
            "prefix_lengths": torch.tensor([len(e) for e in encoded], dtype=torch.long),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the side memory (if any) and the editing state by those `state` holds; later edits
        continue from them."""
        p = self.params
        self.check_state_layer(state, "side memory")
        w = linear_weight(self.original).detach()
        if tuple(state["pending"].shape[1:]) != tuple(w.shape):
            raise ValueError(f"wise: the side memory's copies are {tuple(state['pending'].shape[1:])}, this model's "
                             f"projection is {tuple(w.shape)}")
        edits, parked = int(state["edits_in_shard"]), len(state["pending"])
        if edits >= p.shard_size or parked >= p.num_shards:
            raise ValueError(f"wise: the side memory holds {edits} edit(s) in its current shard and {parked} shard(s) "
                             f"awaiting the merge; this editor's shard_size={p.shard_size}, num_shards={p.num_shards} "
                             "cannot continue it")
        self.reset()
        flat, lengths = bytes(state["prefixes"].tolist()), state["prefix_lengths"].tolist()
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        if bool(state["installed"]):
            self.prefixes = [flat[s:s + n].decode() for s, n in zip(starts, lengths)]
            mem = self._install()
            strides = iter(state["strides"].tolist())

            def restore(saved: torch.Tensor) -> torch.Tensor:  # on the model's device, in its original layout
                copy = torch.empty_strided(w.shape, tuple(next(strides)), dtype=w.dtype, device=w.device)
                return copy.copy_(saved)

            mem.side = restore(state["side"][0]) if len(state["side"]) else None
            mem.pending = [restore(t) for t in state["pending"]]
            mem.current = restore(state["current"][0]) if len(state["current"]) else None
            mem.threshold = float(state["threshold"])
            if mem.current is not None:
                self.grad_mask = state["grad_mask"][0].to(w)
        self.min_edit_score = float(state["min_edit_score"])
        self.edits_in_shard = edits
        self.generator.set_state(state["generator"].clone())
