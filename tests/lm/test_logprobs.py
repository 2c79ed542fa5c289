"""token_logprobs: matches a naive log_softmax, is padding- and chunking-invariant, has gradients."""
from __future__ import annotations

import torch

from lm.logprobs import padding_layout, token_logprobs


def _naive(model, ids):
    """log p(ids[t] | ids[<t]) from the full [B, T, V] logits of an unpadded batch."""
    logp = torch.log_softmax(model(ids).float(), dim=-1)  # [B, T, V]
    out = torch.zeros(ids.shape, dtype=torch.float32)
    out[:, 1:] = logp[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
    return out


def test_matches_naive_and_masks_to_completion(make_model):
    model = make_model()
    ids = torch.randint(0, 96, (3, 14), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids, dtype=torch.bool)
    comp = torch.zeros_like(attn)
    comp[:, 6:] = True
    with torch.no_grad():
        lp = token_logprobs(model, ids, attn, comp)
        ref = _naive(model, ids)
    torch.testing.assert_close(lp[:, 6:], ref[:, 6:], atol=1e-5, rtol=0)
    assert (lp[:, :6] == 0).all()
    with torch.no_grad():
        scaled = token_logprobs(model, ids, attn, comp, temperature=2.0)
        ref2 = torch.log_softmax(model(ids) / 2.0, -1)[:, 5:-1].gather(2, ids[:, 6:, None]).squeeze(2)
    torch.testing.assert_close(scaled[:, 6:], ref2, atol=1e-5, rtol=0)


def test_left_and_right_padding_give_the_same_values(make_model):
    model = make_model()
    seq = torch.randint(0, 96, (10,), generator=torch.Generator().manual_seed(1))
    right = torch.zeros(1, 14, dtype=torch.long)
    right[0, :10] = seq
    left = torch.zeros(1, 14, dtype=torch.long)
    left[0, 4:] = seq
    attn_r = torch.zeros(1, 14, dtype=torch.bool)
    attn_r[0, :10] = True
    attn_l = torch.zeros(1, 14, dtype=torch.bool)
    attn_l[0, 4:] = True
    comp_r = attn_r.clone()
    comp_r[0, :4] = False
    comp_l = attn_l.clone()
    comp_l[0, :8] = False
    assert padding_layout(attn_r) == (None, None)  # right padding takes the is_causal path
    with torch.no_grad():
        a = token_logprobs(model, right, attn_r, comp_r)[0, 4:10]
        b = token_logprobs(model, left, attn_l, comp_l)[0, 8:14]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_chunking_changes_nothing_including_gradients(make_model):
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    attn = torch.ones_like(ids, dtype=torch.bool)
    comp = attn.clone()
    comp[:, :3] = False
    grads, values = [], []
    for chunk_elements in (1 << 22, 96 * 5):  # one chunk vs 5-row chunks (checkpointed)
        model = make_model().train()
        lp = token_logprobs(model, ids, attn, comp, chunk_elements=chunk_elements)
        (lp.sum() / comp.sum()).backward()
        values.append(lp.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(values[0], values[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    assert grads[0].abs().sum() > 0
