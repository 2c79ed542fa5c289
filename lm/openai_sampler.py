"""A `Sampler` that sends generation to an OpenAI-compatible completions server (vLLM, SGLang,
llama.cpp), for the sampling-only stages: the same `generate(prompts, params, seed)` as
`lm.sampler.TorchSampler`, so stage code keeps one path.

Where from: the legacy `/v1/completions` endpoint of the OpenAI API as vLLM, SGLang and
llama-cpp-python serve it, the way open-r1 sends its teacher's generations to a vLLM server.
How it runs:

- Prompts arrive as r1flow's token ids (already templated); each is decoded back to its text
  with r1flow's tokenizer and sent as `prompt`. A leading BOS id is dropped only when the
  tokenizer says its model wants one prepended (`add_bos`: the server's tokenizer adds it); a BOS
  the chat template wrote (SmolLM2's "<|im_start|>" is its BOS) stays text, which servers parse
  back into the special token. One request per row with `n = 1` and the row's own `seed` (llama-cpp-python
  ignores `n`; a per-row seed keeps a row's sample independent of the batch around it), sent
  `concurrency` at a time from a thread pool; results come back in row order.
- Sampling fields: `max_tokens`, `temperature` (0 = greedy), `top_p`, `top_k` only when it is on
  (servers disagree on what 0 means), `seed`, `logprobs = 0` (the sampled token's log-prob) and
  the settings' `extra_body` (server-specific fields, e.g. llama.cpp's `top_k`, `min_p` and
  `repeat_penalty`, whose defaults are not neutral).
- Stops: r1flow's stop strings and the text of its stop token ids go out as `stop`, with vLLM's
  `include_stop_str_in_output` and SGLang's `no_stop_trim` so the stop string stays in the text
  ("</answer>" is part of the answer's format; the torch sampler keeps it). A server that trims
  it anyway (llama-cpp-python) is caught: a "stop" finish whose text lacks the stop string gets
  it back when the server names it (`stop_reason`, `matched_stop`) or when its per-token strings
  (`logprobs.tokens`, which llama-cpp-python fills up to and including the stop string) show it;
  if neither tells, the sampler raises rather than guess (`server_stops = False` then makes
  r1flow cut the text itself). A text that runs past a stop string is cut just after it.
- Token ids: servers do not return ids in the completions API (vLLM only on request, and in its
  model's vocabulary, which need not be r1flow's), so `token_ids` are the returned text
  re-tokenized with r1flow's tokenizer (the `encode` callable: the stage's own encoding of model
  text), plus the end-of-text id when the server stopped at end-of-text, as the torch sampler
  keeps its stopping token. `n_tokens` therefore counts r1flow's tokens.
- Log-probs: the server's `logprobs.token_logprobs`, the log-probabilities of its sampled tokens
  under the raw (temperature 1) distribution, as the torch sampler records them (vLLM's and
  llama-cpp-python's default). They are the server's tokens, one-to-one with `token_ids` only when
  the server's tokenizer splits the text as r1flow's does; stages use their mean. A server that
  returns none gives `logprobs == []` (the stages then record null, never a made-up number).
- Failures: connection errors, timeouts, 5xx and 429 are retried with exponential backoff
  (`backoff_s * 2**attempt`, or the server's numeric Retry-After); after `max_retries` the sampler
  raises `ServerError` naming the URL. Other 4xx fail at once with the server's message. At start
  `GET /v1/models` must list `model`. Responses are untrusted input: their JSON shape is checked
  field by field and nothing in them is evaluated.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import httpx

from lm.sampler import Generation, SamplingParams, Seed
from lm.tokenizer import Tokenizer

__all__ = ["ServerSettings", "ServerError", "OpenAISampler", "row_seeds"]

_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_MAX_SEED = 2**31  # llama.cpp takes a uint32 seed, vLLM an int: 31 bits fit both


class ServerError(ValueError):
    """The server cannot be used (unreachable, another model, a malformed answer); the message
    names the URL. A ValueError, so a stage failing on it reads as a stage failure, not a bug."""


@dataclass(frozen=True)
class ServerSettings:
    """Where and how to reach the server (`run.sampler` in the run config).

    Attributes:
        base_url: the API root, e.g. "http://127.0.0.1:8000/v1".
        model: the model name the server serves (checked against `GET /models`).
        concurrency: requests in flight at once.
        timeout_s: per-request timeout (connect, read, write).
        max_retries: retries after the first try for connection errors, timeouts, 5xx and 429.
        backoff_s: the first retry's wait; each further retry doubles it.
        logprobs: ask for the sampled tokens' log-probs.
        server_stops: send stop strings to the server (False: r1flow cuts the text itself).
        extra_body: further request fields, sent as they are.
        api_key_env: name of an environment variable holding a bearer token (never the key itself).
    """

    base_url: str
    model: str
    concurrency: int = 8
    timeout_s: float = 600.0
    max_retries: int = 5
    backoff_s: float = 1.0
    logprobs: bool = True
    server_stops: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)
    api_key_env: str | None = None


def row_seeds(seed: Seed, n_rows: int) -> list[int]:
    """One 31-bit request seed per row: row r of a call with one seed draws from (seed, r); with one
    seed per row, the k-th row carrying seed s draws from (s, k), so rows sharing a seed (a GRPO
    group) still get different samples, each independent of the other streams in the batch."""
    if isinstance(seed, int):
        keys = [(seed, r) for r in range(n_rows)]
    else:
        if len(seed) != n_rows:
            raise ValueError(f"{len(seed)} seeds for {n_rows} prompts")
        seen: dict[int, int] = {}
        keys = []
        for s in seed:
            k = seen.get(int(s), 0)
            seen[int(s)] = k + 1
            keys.append((int(s), k))
    return [int.from_bytes(hashlib.sha256(f"{s}:{k}".encode()).digest()[:8], "big") % _MAX_SEED for s, k in keys]


class OpenAISampler:
    """The `Sampler` of an OpenAI-compatible completions server (see the module docstring).

    Args:
        settings: server address, model name, concurrency, retry policy.
        tokenizer: r1flow's tokenizer of the stage's checkpoint: decodes the prompts, supplies the
            end-of-text id and the text of stop token ids.
        encode: re-tokenizes a returned completion text into r1flow ids (default
            `tokenizer.encode(text, allow_special=False)`: model output is untrusted text).
        client: an httpx.Client to use (tests); by default one is made with the settings' timeout.
        sleep: waits between retries (tests pass a recorder).
    """

    def __init__(self, settings: ServerSettings, tokenizer: Tokenizer, *,
                 encode: Callable[[str], list[int]] | None = None, client: httpx.Client | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if settings.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {settings.concurrency}")
        self.settings = settings
        self.tokenizer = tokenizer
        self.encode = encode or (lambda text: tokenizer.encode(text, allow_special=False))
        self.base_url = settings.base_url.rstrip("/")
        self._sleep = sleep
        headers = {}
        if settings.api_key_env:
            key = os.environ.get(settings.api_key_env)
            if not key:
                raise ServerError(f"run.sampler.api_key_env names ${settings.api_key_env}, which is not set")
            headers["Authorization"] = f"Bearer {key}"
        self.client = client or httpx.Client(timeout=settings.timeout_s, headers=headers)
        self.server_models = self.check_model()

    @property
    def origin(self) -> str:
        """What the samples came from, for the stages' `origin` column: the server's model."""
        return f"server:{self.settings.model}"

    def close(self) -> None:
        """Close the HTTP connections."""
        self.client.close()

    # ---- the server -------------------------------------------------------------------------

    def check_model(self) -> list[str]:
        """The model ids `GET /models` lists; raise ServerError unless `settings.model` is one."""
        body = self._request("GET", "/models", None)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data):
            raise ServerError(f"{self.base_url}/models: expected {{\"data\": [{{\"id\": ...}}, ...]}}, "
                              f"got {_preview(body)}")
        ids = [m["id"] for m in data]
        if self.settings.model not in ids:
            raise ServerError(f"the server at {self.base_url} serves {ids}, not run.sampler.model = "
                              f"{self.settings.model!r}: start it on the model you want, or set run.sampler.model "
                              "to the name it serves")
        return ids

    def _request(self, method: str, path: str, payload: dict[str, Any] | None) -> Any:
        """One API call with retries; the parsed JSON body."""
        url = self.base_url + path
        last = ""
        for attempt in range(self.settings.max_retries + 1):
            wait = self.settings.backoff_s * 2**attempt
            try:
                response = self.client.request(method, url, json=payload)
            except httpx.TransportError as e:  # refused, reset, DNS, timeouts
                last = f"{type(e).__name__}: {e}"
            else:
                if response.status_code < 400:
                    try:
                        return response.json()
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        raise ServerError(f"{url} answered with non-JSON ({e}): {response.text[:200]!r}") from e
                if response.status_code not in _RETRY_STATUS:
                    raise ServerError(f"{url} rejected the request: HTTP {response.status_code}: "
                                      f"{response.text[:500]}")
                last = f"HTTP {response.status_code}: {response.text[:200]}"
                wait = _retry_after(response, wait)
            if attempt < self.settings.max_retries:
                self._sleep(wait)
        raise ServerError(f"the server at {url} did not answer after {self.settings.max_retries + 1} tries "
                          f"({last}); is it running? (run.sampler.base_url = {self.settings.base_url!r})")

    # ---- generation ---------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: Seed = 0) -> list[Generation]:
        """One `Generation` per prompt, in order (see the module docstring for what the fields
        hold); `seed` is one int, or one per prompt (`row_seeds`)."""
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        seeds = row_seeds(seed, len(prompts))
        stops = self._stop_strings(params)
        jobs = [(p, s) for p, s in zip(prompts, seeds)]
        if len(jobs) <= 1 or self.settings.concurrency == 1:
            return [self._one(p, params, s, stops) for p, s in jobs]
        with ThreadPoolExecutor(max_workers=min(self.settings.concurrency, len(jobs))) as pool:
            return list(pool.map(lambda job: self._one(job[0], params, job[1], stops), jobs))

    def request_body(self, prompt_ids: Sequence[int], params: SamplingParams, seed: int,
                     stops: Sequence[str]) -> dict[str, Any]:
        """The JSON body of one completions request."""
        ids = list(prompt_ids)
        if self.tokenizer.add_bos and ids and ids[0] == self.tokenizer.bos_id:
            ids = ids[1:]  # a model that wants a BOS gets it from the server's tokenizer, not twice
        body: dict[str, Any] = {
            "model": self.settings.model,
            "prompt": self.tokenizer.decode(ids),
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": seed,
            "n": 1,
            "stream": False,
        }
        if params.top_k > 0:
            body["top_k"] = params.top_k
        if self.settings.logprobs:
            body["logprobs"] = 0
        if stops and self.settings.server_stops:
            body["stop"] = list(stops)
            body["include_stop_str_in_output"] = True  # vLLM: keep the stop string in the text
            body["no_stop_trim"] = True  # SGLang: the same
        body.update(self.settings.extra_body)
        return body

    def _stop_strings(self, params: SamplingParams) -> list[str]:
        """r1flow's stop strings plus the text of its stop token ids (end-of-text excluded: the
        server stops at its own model's end-of-text)."""
        out = list(params.stop_strings)
        for t in params.stop_token_ids:
            if t in (self.tokenizer.eos_id, self.tokenizer.pad_id):
                continue
            text = self.tokenizer.decode([t])
            if text and text not in out:
                out.append(text)
        return out

    def _one(self, prompt_ids: list[int], params: SamplingParams, seed: int, stops: list[str]) -> Generation:
        body = self._request("POST", "/completions", self.request_body(prompt_ids, params, seed, stops))
        choice = _the_choice(body, self.base_url)
        text, finish, logprobs = self._finish(choice, stops)
        ids = self.encode(text)
        if finish == "stop" and not any(text.endswith(s) for s in stops):
            ids.append(self.tokenizer.eos_id)  # stopped at end-of-text: keep it, as the torch sampler does
        return Generation(prompt_ids=list(prompt_ids), token_ids=ids, logprobs=logprobs, finish_reason=finish)

    def _finish(self, choice: dict[str, Any], stops: list[str]) -> tuple[str, str, list[float]]:
        """(text ending at and including its first stop string, "stop" | "length", log-probs)."""
        text: str = choice["text"]
        finish = "stop" if choice["finish_reason"] == "stop" else "length"
        logprobs, token_strs = _logprobs(choice.get("logprobs"), self.base_url)
        hit = _first_stop(text, stops)
        if hit is not None:  # the server ran past a stop string, or kept it (vLLM, SGLang)
            end = hit[0] + len(hit[1])
            if end < len(text) and token_strs is not None:
                logprobs = _trim(logprobs, token_strs, end)
            return text[:end], "stop", logprobs
        if finish == "stop" and stops:
            named = choice.get("stop_reason", choice.get("matched_stop", _ABSENT))
            if isinstance(named, str) and named in stops:
                return text + named, "stop", logprobs
            if named is not _ABSENT:  # null or a token id: the server's end-of-text
                return text, "stop", logprobs
            if token_strs is not None:
                trimmed = _first_stop("".join(token_strs), stops)
                return (text + trimmed[1] if trimmed is not None else text), "stop", logprobs
            if self.settings.server_stops:
                raise ServerError(f"{self.base_url}: a completion stopped, and the server says neither which stop "
                                  "ended it nor its tokens, so r1flow cannot tell a trimmed stop string from "
                                  "end-of-text; set run.sampler.logprobs = true, or run.sampler.server_stops = false")
        return text, finish, logprobs


_ABSENT = object()


def _the_choice(body: Any, base_url: str) -> dict[str, Any]:
    """The one choice of a completions response, its shape checked."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        raise ServerError(f"{base_url}/completions: expected one choice, got {_preview(body)}")
    choice = choices[0]
    if not isinstance(choice.get("text"), str):
        raise ServerError(f"{base_url}/completions: the choice has no text: {_preview(choice)}")
    if choice.get("finish_reason") not in ("stop", "length"):
        raise ServerError(f"{base_url}/completions: finish_reason {choice.get('finish_reason')!r} is neither "
                          f"'stop' nor 'length'")
    return choice


def _logprobs(raw: Any, base_url: str) -> tuple[list[float], list[str] | None]:
    """The sampled tokens' log-probs and strings of a choice's `logprobs` (empty / None when absent)."""
    if raw is None:
        return [], None
    if not isinstance(raw, dict):
        raise ServerError(f"{base_url}/completions: logprobs must be an object, got {_preview(raw)}")
    values = raw.get("token_logprobs")
    tokens = raw.get("tokens")
    if values is None:
        return [], None
    if not isinstance(values, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v <= 0 for v in values):
        raise ServerError(f"{base_url}/completions: token_logprobs must be finite numbers <= 0, got {_preview(values)}")
    if tokens is not None and (not isinstance(tokens, list) or len(tokens) != len(values)
                               or not all(isinstance(t, str) for t in tokens)):
        raise ServerError(f"{base_url}/completions: logprobs.tokens must be one string per log-prob, "
                          f"got {_preview(tokens)}")
    return [float(v) for v in values], tokens


def _first_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """(position, stop string) of the earliest stop string in text, if any."""
    found = [(text.find(s), s) for s in stops if s in text]
    return min(found, key=lambda f: (f[0], -len(f[1]))) if found else None


def _trim(logprobs: list[float], token_strs: list[str], end: int) -> list[float]:
    """The log-probs of the tokens that make up the first `end` characters of the text."""
    out, at = [], 0
    for lp, tok in zip(logprobs, token_strs):
        if at >= end:
            break
        out.append(lp)
        at += len(tok)
    return out


def _retry_after(response: httpx.Response, default: float) -> float:
    """The server's numeric Retry-After (capped at 60 s), else the backoff."""
    value = response.headers.get("retry-after", "")
    try:
        return min(max(float(value), 0.0), 60.0)
    except ValueError:
        return default


def _preview(value: Any) -> str:
    return repr(value)[:200]
