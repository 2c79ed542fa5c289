"""token_logprobs: matches a naive log_softmax, is padding- and chunking-invariant, has gradients."""
from __future__ import annotations

import torch

from lm import logprobs
from lm.logprobs import padding_layout, sequence_hidden, shared_prefix_length, token_logprobs


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


def _prefix_batch(B=4, Lp=10, T=16, seed=3):
    """B right-padded rows that open with the same Lp tokens, then tokens of their own."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 96, (B, T), generator=g)
    ids[:, :Lp] = ids[0, :Lp]
    attn = torch.ones(B, T, dtype=torch.bool)
    for r in range(B):
        attn[r, T - r:] = False  # row r has T - r real tokens
    ids[~attn] = 0
    comp = attn.clone()
    comp[:, :Lp] = False
    return ids, attn, comp


def test_shared_prefix_length_stops_at_the_first_difference_and_leaves_each_row_a_token():
    ids, attn, _ = _prefix_batch(B=3, Lp=10, T=16)
    assert shared_prefix_length(ids, attn) == 10
    same = ids[:1].repeat(3, 1)  # identical rows: capped at the shortest row's length - 1
    assert shared_prefix_length(same, attn) == 13
    ids[2, 4] = (ids[0, 4] + 1) % 96
    assert shared_prefix_length(ids, attn) == 4


def test_a_shared_prefix_runs_once_with_the_same_values_and_gradients(make_model, monkeypatch):
    ids, attn, comp = _prefix_batch(B=4, Lp=10, T=16)
    monkeypatch.setattr(logprobs, "PACK_MIN_PADDING", 2.0)  # padding runs as it is (tested below)
    seen, values, grads = [], [], []
    for share in (True, False):
        if not share:
            monkeypatch.setattr(logprobs, "SHARED_PREFIX_MIN_SAVING", 2.0)  # never worth it: off
        model = make_model().train()
        hook = model.tok_embeddings.register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
        lp = token_logprobs(model, ids, attn, comp)
        (lp.sum() / comp.sum()).backward()
        hook.remove()
        values.append(lp.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert seen == [10, 4 * 6, 4 * 16]  # shared: the prefix once, then each row's rest; unshared: all
    torch.testing.assert_close(values[0], values[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    assert (values[0][~comp] == 0).all() and (values[0][comp] < 0).all()


def test_left_padded_or_short_prefix_batches_run_whole(make_model):
    model = make_model()
    ids, attn, comp = _prefix_batch(B=4, Lp=2, T=16)  # 3 x 2 positions saved of 64: not worth it
    left = torch.flip(ids, [1]), torch.flip(attn, [1])
    seen = []
    model.tok_embeddings.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    with torch.no_grad():
        sequence_hidden(model, ids, attn)
        sequence_hidden(model, *left)
    assert seen == [(4, 16), (4, 16)]


def test_padding_is_skipped_with_the_same_values_and_gradients(make_model, monkeypatch):
    """A batch with >= 10% padding runs only its real tokens through the embeddings, norms,
    projections and feed-forward (`Transformer.forward(packed=...)`): the same log-probs and
    gradients as the padded batch, right or left padded, with or without a shared prefix."""
    ids, attn, comp = _prefix_batch(B=4, Lp=2, T=16)  # rows of 16, 15, 14, 13 real tokens: 9% padding
    ids[3, 8:], attn[3, 8:], comp[3, 8:] = 0, False, False  # 16% padding
    left = torch.flip(ids, [1]), torch.flip(attn, [1]), torch.flip(comp, [1])
    shared = _prefix_batch(B=4, Lp=10, T=16)
    for batch, n_real in (((ids, attn, comp), int(attn.sum())), (left, int(attn.sum())),
                          (shared, 10 + int(shared[1][:, 10:].sum()))):
        seen, values, grads = [], [], []
        for pack in (True, False):
            if not pack:
                monkeypatch.setattr(logprobs, "PACK_MIN_PADDING", 2.0)  # never: padded
            model = make_model().train()
            hook = model.tok_embeddings.register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
            lp = token_logprobs(model, *batch)
            (lp.sum() / batch[2].sum()).backward()
            hook.remove()
            values.append(lp.detach())
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        monkeypatch.undo()
        assert sum(seen[:len(seen) // 2]) == n_real and sum(seen[len(seen) // 2:]) > n_real
        torch.testing.assert_close(values[0], values[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
        scored = batch[2].clone()
        scored[:, 0] = False
        scored[:, 1:] &= batch[1][:, :-1]  # a left-padded row's first real token has no context
        assert (values[0][~scored] == 0).all() and (values[0][scored] < 0).all()
