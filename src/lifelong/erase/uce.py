"""UCE: Unified Concept Editing (Gandikota et al., "Unified Concept Editing in Diffusion Models", WACV 2024).

A closed-form edit of every cross-attention key and value projection W (out x d): the text states c_i of
the erased prompts are mapped to what W gives the anchor's states v*_i = W_old c*_i, while the states
c_j of preserved prompts keep W_old c_j, and W stays near W_old:

    W = argmin  sum_i ||W c_i - v*_i||^2 + s_p sum_j ||W c_j - W_old c_j||^2 + lamb ||W - W_old||_F^2
      = (s_e sum_i v*_i c_i^T + s_p sum_j W_old c_j c_j^T + lamb W_old)
        (s_e sum_i c_i c_i^T + s_p sum_j c_j c_j^T + lamb I)^-1

Several concepts are erased at once by adding their terms (the paper's multi-concept case).

Official recipe (rohitgandikota/unified-concept-editing, train-scripts/train_erase.py: `edit_model` as its
`__main__` calls it): lamb 0.5 (the function's own default, 0.1, is not what the script runs), erase_scale 1,
the retained texts [""] + the preserved concepts (the empty prompt always: it is the unconditional branch of
classifier-free guidance, so its keys and values hold every sample's layout), preserve_scale
max(0.1, 1 / #retained), both K and V edited (`with_to_k`), technique "replace" (v* = W_old c*), the anchor
" " for erasure. Which token states: for an erased prompt, from its last token to the end of the sequence,
aligned from the end with the anchor's states from its last token on (CLIP's causal states carry the prompt
in its last token and after); for a retained text, every position. Here:
  - with a text encoder read under an attention mask (the embedded model: all-MiniLM-L6-v2), only the
    positions the UNet reads are used (up to [SEP]); the masked padding is never attended to, so
    constraining its keys and values would only dilute the edit. Without a mask (Stable Diffusion) the
    official positions are used unchanged.
  - all-MiniLM-L6-v2 is bidirectional: every position of the prompt carries the concept, not only the
    last ones. `positions` "last" is the official choice; "all" (the default here) maps every read
    position of the erased prompt to the anchor's states aligned from the end (earlier positions to the
    anchor's first), as measured by `lifelong bench erase` on the embedded model.
  - the erased prompts are the request's: the concept's name and a few training captions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lifelong.erase.base import EraseRequest


@dataclass(frozen=True)
class Params:
    lamb: float = 0.5              # weight of ||W - W_old||^2 (the official script's)
    erase_scale: float = 1.0
    preserve_scale: float | None = None  # None: max(0.1, 1 / number of retained prompts, "" included), as the official
    keep_unconditional: bool = True  # retain "" (the official always does); False: only the request's preserved
    with_to_k: bool = True         # edit the keys as well as the values
    positions: str = "all"         # "last" (official, for causal text encoders) or "all" read positions

    def __post_init__(self):
        if self.positions not in ("last", "all"):
            raise ValueError(f"positions must be 'last' or 'all', not {self.positions!r}")
        if self.lamb <= 0:
            raise ValueError("lamb must be > 0 (it keeps the system solvable)")


def _aligned_states(model, old: str, new: str, positions: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, c*): the erased prompt's token states and the anchor's aligned to them, (n, d) each."""
    states = model.encode([old, new])
    if states.mask is not None:
        lengths = states.mask.sum(1).tolist()  # real tokens, [CLS] ... [SEP]
    else:
        ids = model.tokenizer([old, new], padding="max_length", truncation=True,
                              max_length=model.tokenizer.model_max_length, return_tensors="pt")
        lengths = ids["attention_mask"].sum(1).tolist()
    n_old, n_new = int(lengths[0]), int(lengths[1])
    last_old, last_new = n_old - 2, n_new - 2  # the last word token (before the end token)
    hidden = states.hidden.detach()
    if states.mask is None:  # the official alignment: from the last word token to the end, tails aligned
        total = hidden.shape[1]
        farthest = max(last_old, last_new)
        c = hidden[0, last_old : total - max(0, farthest - last_old)]
        c_star = hidden[1, last_new : total - max(0, farthest - last_new)]
        if positions == "all":
            head = hidden[0, :last_old]
            c, c_star = torch.cat([head, c]), torch.cat([hidden[1, :1].expand(len(head), -1), c_star])
        return c, c_star
    first = 0 if positions == "all" else max(last_old, 0)
    rows = torch.arange(first, n_old)  # read positions of the erased prompt
    # aligned from the end: the erased prompt's position i reads the anchor's n_new - (n_old - i), at least 0
    partner = (rows - (n_old - n_new)).clamp(min=0)
    return hidden[0, rows], hidden[1, partner]


class UCE:
    name = "uce"
    records = "weights"
    Params = Params

    def __init__(self, params: Params = Params()):
        self.params = params

    @torch.no_grad()
    def erase(self, model, request: EraseRequest, seed: int = 0, progress: bool = False,
              requests: list[EraseRequest] | None = None) -> dict[str, float]:
        """Erase `request` (and every request of `requests` with it, in one edit)."""
        p = self.params
        together = requests or [request]
        pairs = [_aligned_states(model, old, r.anchor or " ", p.positions) for r in together for old in r.prompts]
        retained = [""] if p.keep_unconditional else []
        preserved = list(dict.fromkeys(retained + [q for r in together for q in r.preserve]))
        keep = [_aligned_states(model, q, q, "all")[0] for q in preserved]  # retained texts: every read position
        preserve_scale = p.preserve_scale if p.preserve_scale is not None else max(0.1, 1 / max(len(preserved), 1))
        layers = {n: m for n, m in model.cross_attention_kv().items() if p.with_to_k or n.endswith("to_v")}
        c_all = torch.cat([c for c, _ in pairs])  # (n_e, d)
        c_star = torch.cat([s for _, s in pairs])
        c_keep = torch.cat(keep) if keep else c_all.new_zeros((0, c_all.shape[1]))
        d = c_all.shape[1]
        gram = p.erase_scale * c_all.T @ c_all + preserve_scale * c_keep.T @ c_keep + p.lamb * torch.eye(d)  # (d, d)
        before = {}
        for name, linear in layers.items():
            w = linear.weight.detach().double()  # (out, d)
            before[name] = w
            rhs = (p.erase_scale * (w @ c_star.double().T) @ c_all.double()
                   + preserve_scale * (w @ c_keep.double().T) @ c_keep.double() + p.lamb * w)  # (out, d)
            new = torch.linalg.solve(gram.double(), rhs.T).T  # rhs @ gram^-1 (gram is symmetric)
            linear.weight.copy_(new.to(linear.weight.dtype))
        moved = sum(float((linear.weight.double() - before[n]).norm()) for n, linear in layers.items())
        return {"layers": float(len(layers)), "erased_states": float(len(c_all)), "preserved_states": float(len(c_keep)),
                "weight_change_norm": moved, "steps": 0.0,
                "trainable_params": float(sum(linear.weight.numel() for linear in layers.values()))}
