"""Prefix tuning put on a model in place (modules/prefix.py) computes what peft's prefix-tuning model does."""

import pytest
import torch

from lifelong.families.lm import tiny_lm
from lifelong.modules.peft_wrap import bare_model
from lifelong.modules.prefix import add_prefix, has_prefix, prefix_key_values, remove_prefix


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_in_place_prefix_equals_peft_in_logits_and_generation_and_comes_off_exactly(arch):
    from peft import PrefixTuningConfig, get_peft_model, get_peft_model_state_dict

    model, _ = tiny_lm(arch)
    model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding, as generate's batches
    base = model(input_ids=ids, attention_mask=mask).logits
    wrapped = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    with torch.no_grad():
        wrapped.prompt_encoder["default"].embedding.weight.normal_(generator=g)
    wrapped.eval()
    with torch.no_grad():
        want = wrapped(input_ids=ids, attention_mask=mask).logits
        want_unmasked = wrapped(input_ids=ids[:1]).logits
        want_tokens = wrapped.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                       pad_token_id=0)
    table = get_peft_model_state_dict(wrapped)["prompt_embeddings"]
    model = bare_model(wrapped)

    add_prefix(model, prefix_key_values(model, table, 3))
    assert has_prefix(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, want, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(input_ids=ids[:1]).logits, want_unmasked, atol=1e-6, rtol=0)
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, want_tokens)
    assert (want - base).abs().max() > 1e-2  # the prefix changes the function: the checks above can fail
    with pytest.raises(ValueError, match="already holds a prefix"):
        add_prefix(model, prefix_key_values(model, table, 3))
    remove_prefix(model)
    assert not has_prefix(model)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base)
