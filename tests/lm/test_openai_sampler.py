"""`lm.openai_sampler.OpenAISampler` against an in-process fake OpenAI server (tests/lm/openai_fake.py):
the request shape, retries and backoff, the errors that name the URL, log-prob parsing, stops, and
concurrency that keeps order and seeds. The real-server comparison (llama.cpp on SmolLM2) is
tests/lm/test_openai_sampler_llama_cpp.py, marked slow."""
from __future__ import annotations

import random
import socket
import threading
import time

import httpx
import pytest

from lm.openai_sampler import OpenAISampler, ServerError, ServerSettings, row_seeds
from lm.sampler import SamplingParams
from stages.lm_training import encode_prompt, encode_text
from stages.sampling import sample_completions, sampling_params
from tests.lm.openai_fake import FakeServer, ok
from tests.stages.sampling_fakes import tiny_tokenizer

TOK = tiny_tokenizer()
PROMPT_TEXT = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"


def prompt_ids(text: str = PROMPT_TEXT) -> list[int]:
    return encode_prompt(TOK, text)


def make(url: str, *, model: str = "m", sleeps: list[float] | None = None, **kw) -> OpenAISampler:
    settings = ServerSettings(base_url=url, model=model, **kw)
    return OpenAISampler(settings, TOK, encode=lambda t: encode_text(TOK, t),
                         sleep=(sleeps.append if sleeps is not None else lambda s: None))


PARAMS = sampling_params(TOK, max_new_tokens=20, temperature=0.7, top_p=0.9)  # stops at "</answer>"


def test_request_shape_is_a_completions_call_with_the_templated_prompt_text() -> None:
    with FakeServer(lambda body: ok(" <answer> 5 </answer>")) as s:
        sampler = make(s.url, extra_body={"min_p": 0.0, "repeat_penalty": 1.0})
        gens = sampler.generate([prompt_ids()], PARAMS, seed=7)
    assert s.paths == ["/v1/models", "/v1/completions"]
    body = s.requests[0]
    assert body == {
        "model": "m", "prompt": PROMPT_TEXT, "max_tokens": 20, "temperature": 0.7, "top_p": 0.9,
        "seed": row_seeds(7, 1)[0], "n": 1, "stream": False, "logprobs": 0,
        # "</answer>" is a single stop id in r1flow's tokenizer: it goes out as its text
        "stop": ["</answer>"], "include_stop_str_in_output": True, "no_stop_trim": True,
        "min_p": 0.0, "repeat_penalty": 1.0,
    }
    assert "top_k" not in body  # off (0) is not sent: servers disagree on what 0 means
    g = gens[0]
    assert TOK.decode(g.token_ids) == " <answer> 5 </answer>" and g.finish_reason == "stop"
    assert g.token_ids[-1] == TOK.special_tokens["</answer>"]  # re-tokenized the way stages encode model text
    assert g.prompt_ids == prompt_ids()


def test_top_k_is_sent_when_on_and_a_leading_bos_is_left_to_a_server_that_adds_one(monkeypatch) -> None:
    start = TOK.special_tokens["<|im_start|>"]
    monkeypatch.setattr(TOK, "bos_id", start)  # pretend <|im_start|> were the BOS (as in SmolLM2)
    params = SamplingParams(max_new_tokens=3, temperature=1.0, top_k=5)
    with FakeServer(lambda body: ok("x", "length")) as s:
        sampler = make(s.url)
        sampler.generate([[start, *TOK.encode("hi")]], params, seed=0)  # SmolLM2: add_bos False
        monkeypatch.setattr(TOK, "add_bos", True)  # a model whose tokenizer prepends its BOS
        sampler.generate([[start, *TOK.encode("hi")]], params, seed=0)
    assert [r["prompt"] for r in s.requests] == ["<|im_start|>hi", "hi"]
    assert s.requests[0]["top_k"] == 5
    assert "stop" not in s.requests[0]  # no stop strings, no stop field


def test_retries_with_exponential_backoff_then_answers() -> None:
    failures = [(503, {"error": "loading"}, {}), (429, {"error": "busy"}, {}), (502, "bad gateway", {})]

    def answer(body):
        return failures.pop(0) if failures else ok("done", "length")

    sleeps: list[float] = []
    with FakeServer(answer) as s:
        gens = make(s.url, sleeps=sleeps, backoff_s=0.5, max_retries=3).generate([prompt_ids()], PARAMS, 0)
    assert len(s.requests) == 4 and TOK.decode(gens[0].token_ids) == "done"
    assert sleeps == [0.5, 1.0, 2.0]  # backoff_s * 2**attempt


def test_retry_after_from_the_server_replaces_the_backoff() -> None:
    failures = [(429, {"error": "slow down"}, {"Retry-After": "0.25"})]
    sleeps: list[float] = []
    with FakeServer(lambda body: failures.pop(0) if failures else ok("a", "length")) as s:
        make(s.url, sleeps=sleeps, backoff_s=4.0).generate([prompt_ids()], PARAMS, 0)
    assert sleeps == [0.25]


def test_a_server_that_keeps_failing_names_the_url_after_the_last_retry() -> None:
    sleeps: list[float] = []
    with FakeServer(lambda body: (500, {"error": "boom"}, {})) as s:
        sampler = make(s.url, sleeps=sleeps, backoff_s=1.0, max_retries=2)
        with pytest.raises(ServerError, match=f"{s.url}/completions did not answer after 3 tries.*HTTP 500"):
            sampler.generate([prompt_ids()], PARAMS, 0)
    assert sleeps == [1.0, 2.0] and len(s.requests) == 3


def test_a_client_error_fails_at_once_with_the_servers_message() -> None:
    with FakeServer(lambda body: (400, {"error": "max_tokens too large"}, {})) as s:
        with pytest.raises(ServerError, match="rejected the request: HTTP 400.*max_tokens too large"):
            make(s.url).generate([prompt_ids()], PARAMS, 0)
    assert len(s.requests) == 1


def test_an_unreachable_server_is_an_error_naming_the_url() -> None:
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    sleeps: list[float] = []
    with pytest.raises(ServerError) as err:
        make(url, sleeps=sleeps, max_retries=3, backoff_s=0.1)
    assert f"{url}/models did not answer after 4 tries (ConnectError" in str(err.value)
    assert "run.sampler.base_url" in str(err.value)
    assert sleeps == pytest.approx([0.1, 0.2, 0.4])


def test_a_server_serving_another_model_is_an_error() -> None:
    with FakeServer(lambda body: ok("x"), models=["SmolLM2-135M-Instruct.Q4_1.gguf"]) as s:
        with pytest.raises(ServerError, match=r"serves \['SmolLM2-135M-Instruct.Q4_1.gguf'\], not "
                                              r"run.sampler.model = 'teacher'") as err:
            make(s.url, model="teacher")
        assert s.url in str(err.value)
        assert s.requests == []  # nothing was generated


@pytest.mark.parametrize("models_body", [{"data": "m"}, {"data": [{"name": "m"}]}, ["m"]])
def test_a_malformed_models_answer_is_an_error(models_body) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=models_body))
    with pytest.raises(ServerError, match=r"http://h:1/v1/models: expected"):
        OpenAISampler(ServerSettings(base_url="http://h:1/v1", model="m"), TOK, client=httpx.Client(transport=transport))


def logprobs_choice(tokens: list[str], values: list[float]) -> dict:
    return {"logprobs": {"tokens": tokens, "token_logprobs": values, "top_logprobs": None,
                         "text_offset": list(range(len(tokens)))}}


def test_logprobs_are_the_servers_and_their_mean_reaches_the_completion() -> None:
    with FakeServer(lambda body: ok(" 5", "length", **logprobs_choice([" ", "5"], [-0.5, -1.5]))) as s:
        sampler = make(s.url)
        gens = sampler.generate([prompt_ids()], PARAMS, 0)
        (c,), = sample_completions(sampler, TOK, [prompt_ids()], n=1, params=PARAMS, batch_size=4, seed=0)
    assert gens[0].logprobs == [-0.5, -1.5]
    assert c.logprob_mean == pytest.approx(-1.0) and c.finish_reason == "length"


def test_a_server_without_logprobs_records_none_rather_than_a_number() -> None:
    with FakeServer(lambda body: ok(" 5", "length", logprobs=None)) as s:
        sampler = make(s.url)
        (c,), = sample_completions(sampler, TOK, [prompt_ids()], n=1, params=PARAMS, batch_size=4, seed=0)
    assert c.logprob_mean is None and c.text == " 5"


def test_logprobs_off_does_not_ask_for_them() -> None:
    with FakeServer(lambda body: ok(" 5", "length")) as s:
        make(s.url, logprobs=False).generate([prompt_ids()], PARAMS, 0)
    assert "logprobs" not in s.requests[0]


@pytest.mark.parametrize("choice", [
    {"text": 5, "finish_reason": "stop"},
    {"text": "a", "finish_reason": "tool_calls"},
    {"text": "a", "finish_reason": "stop", "logprobs": {"token_logprobs": ["-1"], "tokens": ["a"]}},
    {"text": "a", "finish_reason": "stop", "logprobs": {"token_logprobs": [0.5], "tokens": ["a"]}},
    {"text": "a", "finish_reason": "stop", "logprobs": {"token_logprobs": [-1.0], "tokens": ["a", "b"]}},
    {"text": "a", "finish_reason": "stop", "logprobs": "__import__('os')"},
])
def test_malformed_completions_are_rejected(choice) -> None:
    with FakeServer(lambda body: (200, {"choices": [choice]}, {})) as s:
        with pytest.raises(ServerError, match=f"{s.url}/completions"):
            make(s.url).generate([prompt_ids()], PARAMS, 0)


def test_two_choices_for_one_request_are_rejected() -> None:
    two = {"choices": [{"text": "a", "finish_reason": "stop"}, {"text": "b", "finish_reason": "stop"}]}
    with FakeServer(lambda body: (200, two, {})) as s:
        with pytest.raises(ServerError, match="expected one choice"):
            make(s.url).generate([prompt_ids()], PARAMS, 0)


# ------------------------------------------------------------------------------------- stops

ANSWER_ID = TOK.special_tokens["</answer>"]


@pytest.mark.parametrize("choice, text", [
    # vLLM with include_stop_str_in_output: the stop string is in the text
    (dict(text=" <answer> 5 </answer>", finish_reason="stop", stop_reason="</answer>"), " <answer> 5 </answer>"),
    # a server that ignored `stop` and ran on: cut just after the first stop string
    (dict(text=" <answer> 5 </answer> and more", finish_reason="length"), " <answer> 5 </answer>"),
    # vLLM/SGLang trimming but naming the stop
    (dict(text=" <answer> 5 ", finish_reason="stop", stop_reason="</answer>"), " <answer> 5 </answer>"),
    (dict(text=" <answer> 5 ", finish_reason="stop", matched_stop="</answer>"), " <answer> 5 </answer>"),
    # llama-cpp-python: trims the text, but its per-token strings run through the stop string
    (dict(text=" <answer> 5 ", finish_reason="stop",
          **logprobs_choice([" <", "answer", "> ", "5", " </", "answer", ">"], [-0.1] * 7)), " <answer> 5 </answer>"),
])
def test_a_stop_string_stays_in_the_text(choice, text) -> None:
    with FakeServer(lambda body: (200, {"choices": [choice]}, {})) as s:
        (g,) = make(s.url).generate([prompt_ids()], PARAMS, 0)
    assert TOK.decode(g.token_ids) == text and g.finish_reason == "stop"
    assert g.token_ids[-1] == ANSWER_ID  # as the torch sampler keeps its stop token


def test_cut_text_keeps_only_the_log_probs_of_its_tokens() -> None:
    choice = dict(text=" 5 </answer> more", finish_reason="length",
                  **logprobs_choice([" 5", " </answer>", " more"], [-1.0, -2.0, -9.0]))
    with FakeServer(lambda body: (200, {"choices": [choice]}, {})) as s:
        (g,) = make(s.url).generate([prompt_ids()], PARAMS, 0)
    assert g.logprobs == [-1.0, -2.0]


@pytest.mark.parametrize("choice", [
    dict(text=" 5", finish_reason="stop", stop_reason=None),  # vLLM: end-of-text
    dict(text=" 5", finish_reason="stop", **logprobs_choice([" ", "5"], [-0.1, -0.2])),  # llama.cpp: EOS
])
def test_end_of_text_is_kept_as_the_eos_id(choice) -> None:
    with FakeServer(lambda body: (200, {"choices": [choice]}, {})) as s:
        (g,) = make(s.url).generate([prompt_ids()], PARAMS, 0)
        (c,), = sample_completions(make(s.url), TOK, [prompt_ids()], n=1, params=PARAMS, batch_size=1, seed=0)
    assert g.token_ids[-1] == TOK.eos_id and g.finish_reason == "stop"
    assert c.text == " 5" and c.n_tokens == len(g.token_ids)  # completion_text drops the final eos


def test_an_ambiguous_stop_is_an_error_not_a_guess() -> None:
    with FakeServer(lambda body: ok(" 5")) as s:  # "stop", no stop_reason, no logprobs
        with pytest.raises(ServerError, match="cannot tell a trimmed stop string from end-of-text"):
            make(s.url, logprobs=False).generate([prompt_ids()], PARAMS, 0)


def test_client_side_stops_send_no_stop_and_cut_the_text() -> None:
    with FakeServer(lambda body: ok(" <answer> 5 </answer> more text")) as s:
        (g,) = make(s.url, server_stops=False, logprobs=False).generate([prompt_ids()], PARAMS, 0)
    assert "stop" not in s.requests[0]
    assert TOK.decode(g.token_ids) == " <answer> 5 </answer>" and g.finish_reason == "stop"


# ------------------------------------------------------------------------------- concurrency

def test_concurrent_requests_keep_row_order_and_row_seeds() -> None:
    rng = random.Random(0)
    delays = {}
    lock = threading.Lock()

    def answer(body):
        with lock:
            delay = delays.setdefault(body["prompt"], rng.uniform(0.0, 0.05))
        time.sleep(delay)  # answers come back out of order
        return ok(f"{body['prompt'][-3:]}|{body['seed']}", "length")

    prompts = [TOK.encode(f"q{i:02d}") for i in range(24)]
    with FakeServer(answer) as s:
        sampler = make(s.url, concurrency=6)
        first = sampler.generate(prompts, PARAMS, seed=11)
        again = sampler.generate(prompts, PARAMS, seed=11)
    seeds = row_seeds(11, 24)
    assert [TOK.decode(g.token_ids) for g in first] == [f"q{i:02d}|{seeds[i]}" for i in range(24)]
    assert [g.token_ids for g in again] == [g.token_ids for g in first]
    assert 1 < s.max_in_flight <= 6


def test_row_seeds() -> None:
    assert row_seeds(3, 4) == row_seeds(3, 4) and len(set(row_seeds(3, 4))) == 4
    assert row_seeds(3, 4) != row_seeds(4, 4)
    assert all(0 <= x < 2**31 for x in row_seeds(2**62, 8))
    # one seed per row: rows sharing a seed draw different, batch-independent seeds
    grouped = row_seeds([5, 5, 9, 9], 4)
    assert grouped[0] != grouped[1] and grouped[:2] == row_seeds([5, 5], 2)
    assert grouped[2:] == row_seeds([9, 9], 2)
    with pytest.raises(ValueError, match="3 seeds for 2 prompts"):
        row_seeds([1, 2, 3], 2)


def test_api_key_comes_from_the_named_environment_variable(monkeypatch) -> None:
    seen = []
    with FakeServer(lambda body: ok("x", "length")) as s:
        with pytest.raises(ServerError, match=r"\$R1FLOW_TEST_KEY, which is not set"):
            make(s.url, api_key_env="R1FLOW_TEST_KEY")
        monkeypatch.setenv("R1FLOW_TEST_KEY", "sekrit")
        sampler = make(s.url, api_key_env="R1FLOW_TEST_KEY")
        seen.append(sampler.client.headers["authorization"])
    assert seen == ["Bearer sekrit"]
