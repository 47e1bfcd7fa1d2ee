"""Held-out and general-text evaluation of the base model against base + adapter."""

import math
from typing import TYPE_CHECKING

from .data import Example, TokenCounter

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _ids(tokenizer: "PreTrainedTokenizerBase", messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                         return_dict=False)


def count_tokens(tokenizer: "PreTrainedTokenizerBase") -> TokenCounter:
    """Token length of a row as it is trained: chat template applied, answer included."""
    def count(example: Example) -> int:
        return len(_ids(tokenizer, example.messages() + [{"role": "assistant", "content": example.completion}]))

    return count


def completion_loss(model: "PreTrainedModel | PeftModel", tokenizer: "PreTrainedTokenizerBase",
                    examples: list[Example], max_seq_len: int) -> float:
    """Mean negative log-likelihood per answer token, the prompt excluded, as in training."""
    import torch

    nll, tokens = 0.0, 0
    for ex in examples:
        prompt = _ids(tokenizer, ex.messages(), add_generation_prompt=True)
        full = _ids(tokenizer, ex.messages() + [{"role": "assistant", "content": ex.completion}])[:max_seq_len]
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


def generation_scores(model: "PreTrainedModel | PeftModel", tokenizer: "PreTrainedTokenizerBase",
                      examples: list[Example], max_new_tokens: int) -> dict:
    """Greedy answers scored against the references: exact match and ROUGE-L F1."""
    import torch
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    exact, rouge, samples = 0, 0.0, []
    for ex in examples:
        prompt = _ids(tokenizer, ex.messages(), add_generation_prompt=True)
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        answer = tokenizer.decode(out[0][len(prompt):], skip_special_tokens=True).strip()
        exact += answer == ex.completion.strip()
        rouge += scorer.score(ex.completion, answer)["rougeL"].fmeasure
        samples.append({"question": ex.prompt[-1][1], "reference": ex.completion, "answer": answer})
    n = max(len(examples), 1)
    return {"exact_match": exact / n, "rouge_l": rouge / n, "samples": samples}


def measure(model: "PreTrainedModel | PeftModel", tokenizer: "PreTrainedTokenizerBase",
            held_out: list[Example], general_text: str | None, max_seq_len: int,
            generations: int, max_new_tokens: int) -> dict:
    loss = completion_loss(model, tokenizer, held_out, max_seq_len)
    result = {"eval_loss": loss, "eval_perplexity": math.exp(loss),
              **generation_scores(model, tokenizer, held_out[:generations], max_new_tokens)}
    if general_text:
        result["general_perplexity"] = math.exp(text_loss(model, tokenizer, general_text, max_seq_len))
    return result


def compare(peft_model: "PeftModel", tokenizer: "PreTrainedTokenizerBase", held_out: list[Example],
            general_text: str | None, max_seq_len: int, generations: int, max_new_tokens: int) -> dict:
    """The same metrics with the adapter disabled (the base model) and enabled."""
    with peft_model.disable_adapter():
        base = measure(peft_model, tokenizer, held_out, general_text, max_seq_len, generations, max_new_tokens)
    adapter = measure(peft_model, tokenizer, held_out, general_text, max_seq_len, generations, max_new_tokens)
    result = {"base": base, "adapter": adapter}
    if general_text:
        result["forgetting"] = adapter["general_perplexity"] / base["general_perplexity"] - 1
    return result


ROWS = [("held-out loss", "eval_loss"), ("held-out perplexity", "eval_perplexity"),
        ("exact match", "exact_match"), ("ROUGE-L", "rouge_l"), ("general perplexity", "general_perplexity")]


def table(metrics: dict) -> str:
    lines = [f"{'metric':<22}{'base':>10}{'adapter':>10}"]
    for label, key in ROWS:
        if key in metrics["base"]:
            lines.append(f"{label:<22}{metrics['base'][key]:>10.3f}{metrics['adapter'][key]:>10.3f}")
    if "forgetting" in metrics:
        lines.append(f"{'forgetting':<22}{'':>10}{metrics['forgetting']:>+10.1%}")
    return "\n".join(lines)
