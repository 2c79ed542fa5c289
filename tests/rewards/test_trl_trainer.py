"""r1flow's rewards inside a real TRL `GRPOTrainer` (the `parity` extra): two steps on a tiny
Llama built locally (nothing downloaded), conversational prompts, the built-in rewards and a
user-style reward, and on every call the same scores as the plain form of the completions."""
from __future__ import annotations

import pytest

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import rewards  # noqa: E402
from rewards.registry import completion_texts  # noqa: E402

WORDS = ["<think>", "</think>", "<answer>", "</answer>", "what", "is", "plus", "two", "four", "the", "answer",
         "2", "3", "4", "5", "user", "assistant", ":"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} \n{% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                              eos_token="[EOS]")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def tiny_llama(tok):
    import torch

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                   bos_token_id=None)
    return transformers.LlamaForCausalLM(cfg)


def recording(fn, calls):
    """The reward as TRL sees it (same name), recording each call's kwargs and scores."""
    def reward(**kwargs):
        out = fn(**kwargs)
        calls.append((kwargs, out))
        return out

    reward.__name__ = fn.__name__
    return reward


def user_reward(prompts, completions, completion_ids, answer, trainer_state, log_metric, **kwargs):
    log_metric("user_reward_calls", 1.0)
    return [float(len(ids)) / 8 for ids in completion_ids]


@pytest.mark.slow  # ~25 s of CPU (minutes on the shared test machine)
def test_grpo_trainer_runs_two_steps_with_r1flow_rewards(tmp_path):
    tok = tiny_tokenizer()
    rows = [{"prompt": [{"role": "user", "content": f"what is {a} plus two"}], "answer": str(a + 2),
             "language": "en"} for a in (2, 3)] * 4
    calls: list = []
    funcs = [recording(rewards.accuracy_reward, calls), recording(rewards.format_reward, calls),
             recording(rewards.language_consistency_reward, calls), recording(rewards.overlong_penalty, calls),
             recording(rewards.repetition_penalty, calls), recording(user_reward, calls)]
    args = trl.GRPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=8, logging_steps=1, report_to=[], save_strategy="no",
                          use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0)
    trainer = trl.GRPOTrainer(model=tiny_llama(tok), reward_funcs=funcs, args=args,
                              train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    trainer.train()
    assert trainer.state.global_step == 2
    assert len(calls) == 2 * len(funcs)
    for kwargs, out in calls:
        # TRL's exact call: conversational completions, token ids, the dataset's columns, the hooks
        assert {"prompts", "completions", "completion_ids", "answer", "language", "trainer_state",
                "log_extra", "log_metric"} <= set(kwargs)
        assert isinstance(kwargs["completions"][0], list) and kwargs["completions"][0][0]["role"] == "assistant"
        assert len(out) == len(kwargs["completions"])
    by_name: dict = {}  # TRL calls the reward functions in order, once per step
    for i, (kwargs, out) in enumerate(calls):
        by_name.setdefault(funcs[i % len(funcs)].__name__, []).append((kwargs, out))
    for fn in (rewards.accuracy_reward, rewards.format_reward, rewards.language_consistency_reward,
               rewards.overlong_penalty, rewards.repetition_penalty):
        for kwargs, out in by_name[fn.__name__]:
            plain = dict(kwargs, completions=completion_texts(kwargs["completions"]),
                         prompts=[p[-1]["content"] for p in kwargs["prompts"]])
            assert fn(**plain) == out, fn.__name__  # the built-ins score the plain texts the same
    logged = [h for h in trainer.state.log_history if "rewards/accuracy_reward/mean" in h]
    assert len(logged) == 2
