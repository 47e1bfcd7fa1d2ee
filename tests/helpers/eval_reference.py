"""The transformers reference that engine-side evaluation (server/rollout/evaluation.py) must agree with: the trainer's
measurements before they moved to the engine, one example and one window at a time in float32."""

import math
from typing import TYPE_CHECKING

from server.core.examples import Example
from server.rollout.evaluation import generation_scores

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _ids(tokenizer: "PreTrainedTokenizerBase", messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                         return_dict=False)


def completion_loss(model: "PreTrainedModel | PeftModel", tokenizer: "PreTrainedTokenizerBase",
                    examples: list[Example], max_seq_len: int) -> float:
    """Mean negative log-likelihood per answer token, the prompt excluded, as in training."""
    import torch

    nll, tokens = 0.0, 0
    for ex in examples:
        prompt = _ids(tokenizer, ex.messages(), add_generation_prompt=True)
        full = _ids(tokenizer, ex.conversation())[:max_seq_len]
        labels = [-100] * len(prompt) + full[len(prompt):]
        targets = sum(1 for t in labels[1:] if t != -100)
        if targets == 0:
            continue
        with torch.no_grad():
            out = model(input_ids=torch.tensor([full]), labels=torch.tensor([labels]))
        nll += out.loss.item() * targets
        tokens += targets
    return nll / max(tokens, 1)


def text_loss(model: "PreTrainedModel | PeftModel", tokenizer: "PreTrainedTokenizerBase",
              text: str, max_seq_len: int) -> float:
    """Mean negative log-likelihood per token of plain text, in windows of max_seq_len."""
    import torch

    ids = tokenizer(text)["input_ids"]
    nll, tokens = 0.0, 0
    for start in range(0, len(ids), max_seq_len):
        window = ids[start:start + max_seq_len]
        if len(window) < 2:
            continue
        with torch.no_grad():
            out = model(input_ids=torch.tensor([window]), labels=torch.tensor([window]))
        nll += out.loss.item() * (len(window) - 1)
        tokens += len(window) - 1
    return nll / max(tokens, 1)


def greedy_answers(model: "PreTrainedModel | PeftModel", tokenizer: "PreTrainedTokenizerBase",
                   examples: list[Example], max_new_tokens: int) -> list[str]:
    import torch

    answers = []
    for ex in examples:
        prompt = _ids(tokenizer, ex.messages(), add_generation_prompt=True)
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0][len(prompt):], skip_special_tokens=True).strip())
    return answers


def measure(model: "PreTrainedModel | PeftModel", tokenizer: "PreTrainedTokenizerBase",
            held_out: list[Example], general_text: str | None, max_seq_len: int,
            generations: int, max_new_tokens: int) -> dict:
    loss = completion_loss(model, tokenizer, held_out, max_seq_len)
    answers = greedy_answers(model, tokenizer, held_out[:generations], max_new_tokens)
    result = {"eval_loss": loss, "eval_perplexity": math.exp(loss),
              **generation_scores(held_out[:generations], answers)}
    if general_text:
        result["general_perplexity"] = math.exp(text_loss(model, tokenizer, general_text, max_seq_len))
    return result


def compare(peft_model: "PeftModel", tokenizer: "PreTrainedTokenizerBase", held_out: list[Example],
            general_text: str | None, max_seq_len: int, generations: int, max_new_tokens: int) -> dict:
    """The same metrics with the adapter disabled (the base model, the reference) and enabled (the candidate)."""
    with peft_model.disable_adapter():
        ref = measure(peft_model, tokenizer, held_out, general_text, max_seq_len, generations, max_new_tokens)
    cand = measure(peft_model, tokenizer, held_out, general_text, max_seq_len, generations, max_new_tokens)
    result = {"reference": ref, "candidate": cand}
    if general_text:
        result["forgetting"] = cand["general_perplexity"] / ref["general_perplexity"] - 1
    return result
