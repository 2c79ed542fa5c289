"""TorchSampler: cache vs recomputation, padding, log-probs, seeding, stopping, cache reuse."""
from __future__ import annotations

import pytest
import torch

from lm.logprobs import token_logprobs
from lm.model import KVCache, ModelConfig, Transformer
from lm.sampler import Generation, SamplingParams, TorchSampler, completion_text, sample_next

MIXED_PROMPTS = [[5, 17, 33, 2, 9, 11, 40], [7], [60, 61, 62], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [90, 3]]


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])  # MQA, GQA, MHA
def test_greedy_with_cache_equals_full_recomputation_mixed_lengths(make_model, n_kv_heads):
    model = make_model(n_kv_heads=n_kv_heads)
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    cached = TorchSampler(model, None, use_cache=True).generate(MIXED_PROMPTS, params, seed=0)
    full = TorchSampler(model, None, use_cache=False).generate(MIXED_PROMPTS, params, seed=0)
    assert [g.token_ids for g in cached] == [g.token_ids for g in full]
    assert all(len(g.token_ids) == 16 and g.finish_reason == "length" for g in cached)
    for a, b in zip(cached, full):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_batched_greedy_equals_one_prompt_at_a_time(make_model):
    """Left padding changes nothing: each row decodes as if it were alone."""
    model = make_model(n_kv_heads=1)
    sampler = TorchSampler(model, None)
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    batched = sampler.generate(MIXED_PROMPTS, params, seed=0)
    for prompt, gen in zip(MIXED_PROMPTS, batched):
        alone = sampler.generate([prompt], params, seed=0)[0]
        assert gen.token_ids == alone.token_ids
        assert gen.prompt_ids == prompt


def test_sampler_logprobs_equal_training_logprobs(make_model):
    model = make_model()
    params = SamplingParams(max_new_tokens=20, temperature=1.0)
    gens = TorchSampler(model, None).generate(MIXED_PROMPTS, params, seed=3)
    # Re-score the same tokens the way a trainer does: right-padded prompt+completion rows.
    width = max(len(g.prompt_ids) + len(g.token_ids) for g in gens)
    ids = torch.zeros(len(gens), width, dtype=torch.long)
    attn = torch.zeros(len(gens), width, dtype=torch.bool)
    comp = torch.zeros(len(gens), width, dtype=torch.bool)
    for i, g in enumerate(gens):
        seq = g.prompt_ids + g.token_ids
        ids[i, :len(seq)] = torch.tensor(seq)
        attn[i, :len(seq)] = True
        comp[i, len(g.prompt_ids):len(seq)] = True
    with torch.no_grad():
        lp = token_logprobs(model, ids, attn, comp)
    for i, g in enumerate(gens):
        start = len(g.prompt_ids)
        torch.testing.assert_close(lp[i, start:start + len(g.token_ids)], torch.tensor(g.logprobs),
                                   atol=1e-5, rtol=0)


def test_seeded_sampling_is_reproducible(make_model):
    model = make_model()
    sampler = TorchSampler(model, None)
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=20)
    a = sampler.generate(MIXED_PROMPTS, params, seed=7)
    b = TorchSampler(model, None).generate(MIXED_PROMPTS, params, seed=7)
    c = sampler.generate(MIXED_PROMPTS, params, seed=8)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.logprobs for g in a] == [g.logprobs for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]


def test_chunked_batches_use_their_own_seeds(make_model):
    model = make_model()
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    prompts = [[3, 4]] * 6
    small = TorchSampler(model, None, max_batch_size=2).generate(prompts, params, seed=0)
    assert len(small) == 6
    again = TorchSampler(model, None, max_batch_size=2).generate(prompts, params, seed=0)
    assert [g.token_ids for g in small] == [g.token_ids for g in again]


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0], [5.0, 0.0, 0.0, 4.0]])
    g = torch.Generator().manual_seed(0)
    greedy, lp = sample_next(logits, SamplingParams(1, temperature=0.0), g)
    assert greedy.tolist() == [1, 0]
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1)[[0, 1], [1, 0]])
    for _ in range(20):  # top_k=1 and a tiny top_p both leave only the argmax
        assert sample_next(logits, SamplingParams(1, top_k=1), g)[0].tolist() == [1, 0]
        assert sample_next(logits, SamplingParams(1, top_p=0.01), g)[0].tolist() == [1, 0]
    # top_k=2 never picks outside the two best.
    picks = {tuple(sample_next(logits, SamplingParams(1, top_k=2, temperature=5.0), g)[0].tolist())
             for _ in range(100)}
    assert all(p[0] in (1, 2) and p[1] in (0, 3) for p in picks)


def test_sampling_matches_the_softmax_distribution():
    """Gumbel-max sampling draws token i with probability softmax(logits / T)_i."""
    logits = torch.tensor([[1.0, 0.0, -1.0]]).expand(20000, 3)
    tokens, _ = sample_next(logits, SamplingParams(1, temperature=2.0), torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=3).float() / 20000
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 2.0, -1), atol=0.015, rtol=0)


def _first_greedy_tokens(model, prompt, n):
    return TorchSampler(model, None).generate([prompt], SamplingParams(n, temperature=0.0), 0)[0].token_ids


def test_stops_on_stop_token_and_eos(make_model, tokenizer):
    model = make_model(vocab_size=tokenizer.vocab_size, tie_embeddings=False)
    free = _first_greedy_tokens(model, [10, 11, 12], 12)
    stop_tok = free[4]
    first = free.index(stop_tok)
    gen = TorchSampler(model, tokenizer).generate(
        [[10, 11, 12], [10, 11]], SamplingParams(12, temperature=0.0, stop_token_ids=(stop_tok,)), 0)[0]
    assert gen.finish_reason == "stop"
    assert gen.token_ids == free[:first + 1] and len(gen.logprobs) == first + 1
    # End of text stops by default. Make it the first greedy choice: its output row becomes twice
    # the row of the token greedy picked, whose logit is positive, so its logit is the largest.
    with torch.no_grad():
        assert model(torch.tensor([[10, 11, 12]]))[0, -1, free[0]] > 0
        model.output.weight[tokenizer.eos_id] = 2 * model.output.weight[free[0]]
    gen = TorchSampler(model, tokenizer).generate([[10, 11, 12]], SamplingParams(12, temperature=0.0), 0)[0]
    assert gen.finish_reason == "stop" and gen.token_ids == [tokenizer.eos_id]


def test_stops_on_stop_string(make_model, tokenizer):
    model = make_model(vocab_size=tokenizer.vocab_size)
    prompt = tokenizer.encode("User: What is 2 + 3?\nAssistant:")
    free = TorchSampler(model, tokenizer).generate([prompt], SamplingParams(16, temperature=0.0), 0)[0]
    text = completion_text(tokenizer, free)
    assert free.finish_reason in ("length", "stop")
    # Stop at a string made of the bytes of the 3rd and 4th generated tokens.
    target = tokenizer.decode(free.token_ids[2:4])
    if not target.strip() or "\ufffd" in target:
        pytest.skip("random model produced no printable text")
    params = SamplingParams(16, temperature=0.0, stop_strings=(target,))
    gen = TorchSampler(model, tokenizer).generate([prompt, prompt[:3]], params, 0)[0]
    assert gen.finish_reason == "stop"
    assert target in completion_text(tokenizer, gen)
    assert completion_text(tokenizer, gen) == text[:len(completion_text(tokenizer, gen))]
    assert len(gen.token_ids) <= 4


def test_kv_cache_is_allocated_once_and_passed_into_forward(make_model):
    """A spy model: every step receives the same preallocated KVCache; it never grows."""
    model = make_model()
    seen = []
    real_forward = model.forward

    def spy(tokens, **kw):
        cache = kw["cache"]
        seen.append((id(cache), cache.k.data_ptr(), cache.k.shape, tokens.shape[1]))
        return real_forward(tokens, **kw)

    model.forward = spy
    sampler = TorchSampler(model, None)
    sampler.generate(MIXED_PROMPTS, SamplingParams(10, temperature=1.0), seed=0)
    assert len({s[:3] for s in seen}) == 1  # one cache object, one buffer, one shape
    assert seen[0][3] == max(len(p) for p in MIXED_PROMPTS) and all(s[3] == 1 for s in seen[1:])
    assert isinstance(sampler._cache, KVCache) and sampler._cache.pos == 11 + 9
    sampler.generate(MIXED_PROMPTS, SamplingParams(10, temperature=1.0), seed=1)
    assert len({s[:3] for s in seen}) == 1  # reused by the next call with the same shape


def test_invalid_requests(make_model):
    sampler = TorchSampler(make_model(), None)
    with pytest.raises(ValueError, match="max_seq_len"):
        sampler.generate([[1] * 60], SamplingParams(10), 0)
    with pytest.raises(ValueError, match="at least one token"):
        sampler.generate([[]], SamplingParams(10), 0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(10, top_p=0.0)
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        sampler.generate([[1]], SamplingParams(4, stop_strings=("x",)), 0)
    assert sampler.generate([], SamplingParams(4), 0) == []


def test_completion_text_drops_final_eos(tokenizer):
    ids = tokenizer.encode("<answer> 5 </answer>")
    gen = Generation(prompt_ids=[1], token_ids=ids + [tokenizer.eos_id], logprobs=[0.0] * (len(ids) + 1),
                     finish_reason="stop")
    assert completion_text(tokenizer, gen) == "<answer> 5 </answer>"


def test_per_row_seeds_make_a_group_independent_of_its_batch():
    """Rows sharing a seed form one stream: a group samples the same tokens alone, beside other
    groups, or in another order of groups (GRPO shares groups out over ranks this way)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                    max_seq_len=64)).eval()
    sampler = TorchSampler(model)
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    groups = {7: [[1, 2, 3]] * 3, 8: [[4, 5]] * 3, 9: [[6, 7, 8, 9]] * 3}
    together = sampler.generate([p for g in groups.values() for p in g], params,
                                [s for s, g in groups.items() for _ in g])
    alone = {s: sampler.generate(g, params, [s] * len(g)) for s, g in groups.items()}
    assert [x.token_ids for x in together] == [x.token_ids for s in groups for x in alone[s]]
    rev = sampler.generate([p for s in (9, 7) for p in groups[s]], params, [s for s in (9, 7) for _ in groups[s]])
    assert [x.token_ids for x in rev] == [x.token_ids for s in (9, 7) for x in alone[s]]
    assert len({tuple(x.token_ids) for x in alone[7]}) > 1  # rows of one stream still differ
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        sampler.generate(groups[7], params, [1, 2])


def test_a_repeated_prompt_is_prefilled_once_and_samples_as_before(make_model, monkeypatch):
    """GRPO's G copies of a prompt: one prefill row per distinct prompt, the same tokens and
    log-probs as prefilling every row."""
    model = make_model(n_kv_heads=2)
    prompts = [MIXED_PROMPTS[0]] * 3 + [MIXED_PROMPTS[1]] * 2 + [MIXED_PROMPTS[3]]
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    seeds = [3, 3, 3, 4, 4, 5]
    prefill_rows = []
    model.register_forward_pre_hook(lambda m, args: prefill_rows.append(args[0].shape[0]) if args[0].shape[1] > 1
                                    else None)
    shared = TorchSampler(model, None).generate(prompts, params, seeds)
    assert prefill_rows == [3]
    monkeypatch.setattr(TorchSampler, "dedupe_prompts", False)
    every = TorchSampler(model, None).generate(prompts, params, seeds)
    assert prefill_rows == [3, 6]
    assert [g.token_ids for g in shared] == [g.token_ids for g in every]
    for a, b in zip(shared, every):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    assert len({tuple(g.token_ids) for g in shared[:3]}) > 1  # the copies still sample apart


@pytest.mark.parametrize("seed", [5, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]], ids=["one seed", "per-row seeds"])
def test_finished_rows_are_dropped_and_every_row_samples_as_before(make_model, tokenizer, monkeypatch, seed):
    """Once a quarter of the batch has stopped, decoding runs (and caches) only the live rows;
    each row still draws its own noise from the whole batch's stream, so the tokens, log-probs and
    finish reasons are those of decoding every row to the end."""
    model = make_model(vocab_size=tokenizer.vocab_size)
    prompts = [tokenizer.encode(q) for q in ("User: 2 + 3?\nAssistant:", "1 + 1", "User: What is 9 x 9?")] * 4
    free = TorchSampler(model, tokenizer).generate(prompts, SamplingParams(24, temperature=1.0), seed)
    stops = tuple(sorted({g.token_ids[i] for g in free for i in (3, 9) if i < len(g.token_ids)}))  # varied stops
    text = tokenizer.decode(free[0].token_ids[5:7])
    params = SamplingParams(24, temperature=1.0, stop_token_ids=stops, stop_strings=(text,) if text.strip() else ())
    rows_seen: list[int] = []  # rows of each decoding step (one new token per row)
    model.register_forward_pre_hook(lambda m, args: rows_seen.append(args[0].shape[0]) if args[0].shape[1] == 1
                                    else None)
    dropped = TorchSampler(model, tokenizer).generate(prompts, params, seed)
    steps_dropping, rows_seen[:] = rows_seen[:], []
    monkeypatch.setattr(TorchSampler, "drop_finished", False)
    kept = TorchSampler(model, tokenizer).generate(prompts, params, seed)
    assert len(steps_dropping) == len(rows_seen)  # the same number of steps
    assert min(steps_dropping) < len(prompts)  # it shrank its batch
    assert set(rows_seen) == {len(prompts)}  # the other one never did
    assert [g.token_ids for g in dropped] == [g.token_ids for g in kept]
    assert [g.finish_reason for g in dropped] == [g.finish_reason for g in kept]
    assert {g.finish_reason for g in kept} == {"stop", "length"} or all(g.finish_reason == "stop" for g in kept)
    for a, b in zip(dropped, kept):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_kv_cache_keep_rows_moves_the_live_rows_to_the_front(make_model):
    """Decoding the kept rows from a compacted cache gives the logits of decoding them alone."""
    model = make_model()
    rows = torch.tensor([0, 2, 3])
    tokens = torch.randint(0, 96, (4, 6), generator=torch.Generator().manual_seed(0))
    cache = KVCache.for_model(model.config, 4, 8)
    with torch.no_grad():
        model(tokens[:, :5], cache=cache)
        cache.keep_rows(rows)
        step = model(tokens[rows, 5:], cache=cache)[:, -1]  # [3, V]
        alone = model(tokens[rows])[:, -1]  # [3, V]
    assert cache.rows == 3 and cache.pos == 6
    torch.testing.assert_close(step, alone, atol=1e-5, rtol=0)
    cache.reset()
    assert cache.rows == 4 and cache.pos == 0
