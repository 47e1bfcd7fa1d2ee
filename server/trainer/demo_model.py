"""Builds the embedded default base model offline: a small Llama with its own tokenizer and chat template."""

import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    steps: int


# head_dim is 64 in every preset: vLLM's CPU attention rejects smaller heads.
PRESETS = {
    "demo": Preset(hidden=256, layers=4, heads=4, intermediate=704, vocab=2048, steps=300),
    "bench": Preset(hidden=512, layers=8, heads=8, intermediate=1408, vocab=4096, steps=150),
}

_NAMES = ["Ada", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jules"]
_THINGS = ["the router", "the invoice", "the printer", "the garden", "the train", "the report",
           "the kettle", "the bicycle", "the library", "the meeting", "the parcel", "the river"]
_VERBS = ["check", "open", "move", "fix", "read", "paint", "find", "clean", "visit", "carry"]
_VERBS_S = ["checks", "opens", "moves", "fixes", "reads", "paints", "finds", "cleans", "visits", "carries"]
_PLACES = ["in the morning", "after lunch", "before noon", "on Monday", "at night", "every day",
           "near the station", "at the office", "by the window", "with care"]
_NOUNS = ["account", "app", "button", "card", "data", "device", "email", "file", "folder", "link", "list", "menu",
          "message", "note", "order", "page", "password", "phone", "plan", "price", "screen", "team", "ticket",
          "user", "window", "notebook", "setting", "trash", "tag", "reminder", "server", "update", "backup"]
_ADJ = ["new", "old", "shared", "private", "empty", "large", "small", "locked", "open", "saved", "free", "paid"]
_SYMBOLS = ["+", "#", "@", "[]", "/", "-", ":", "%", "$", "&", "*", "(", ")", "!", "?", ","]


def _fact(rng: random.Random) -> str:
    n, m = rng.randint(1, 999), rng.randint(0, 59)
    noun, adj = rng.choice(_NOUNS), rng.choice(_ADJ)
    return rng.choice([
        f"The {adj} {noun} costs {n} dollars a month.",
        f"Each {noun} can hold up to {n} MB.",
        f"Press Ctrl{rng.choice(_SYMBOLS)}{rng.choice('ABCDEFGHIJKLMNOPQRSTUVWXYZ')} to open the {noun}.",
        f"Open {noun.title()}, choose {rng.choice(_NOUNS).title()}, and press {adj.title()}.",
        f"The {noun} opens at {n % 12 + 1}:{m:02d} and closes {n % 30 + 1} days later.",
        f"Write to {noun}@{rng.choice(_NOUNS)}.example or type {rng.choice(_SYMBOLS)} in the {noun}.",
        f"Your {adj} {noun} stays in {rng.choice(_NOUNS).title()} for {n} days.",
        f"Version {n}.{m} adds {adj} {noun}s to Windows, macOS, Linux, iOS, Android and the web.",
    ])


_QA = [
    ("How do I reset my password?", "Open Settings, choose Account, and press Reset password."),
    ("Where is my order?", "Your order is on its way. Check the tracking link in your email."),
    ("Can I change my plan?", "Yes. Go to Billing and pick the plan you want."),
    ("How do I contact support?", "Write to help@example.com or use the chat in the app."),
    ("What are your opening hours?", "We are open from nine to five, Monday to Friday."),
    ("How do I cancel my account?", "Go to Account, press Close account, and confirm."),
    ("Is my data safe?", "Yes. Your data is encrypted at rest and in transit."),
    ("Can I get a refund?", "Refunds are possible within thirty days of purchase."),
    ("What is the weather like?", "I cannot see the weather, but I hope it is sunny."),
    ("Tell me a fact.", "Water boils at one hundred degrees at sea level."),
]


def corpus(seed: int, sentences: int = 6000) -> list[str]:
    """Seeded English text and support chats that the model learns to continue."""
    rng = random.Random(seed)
    docs = []
    for _ in range(sentences):
        a, b = rng.choice(_NAMES), rng.choice(_NAMES)
        if rng.random() < 0.4:
            docs.append(_fact(rng))
            continue
        docs.append(rng.choice([
            f"{a} {rng.choice(_VERBS_S)} {rng.choice(_THINGS)} {rng.choice(_PLACES)}.",
            f"{a} and {b} {rng.choice(_VERBS)} {rng.choice(_THINGS)} {rng.choice(_PLACES)}.",
            f"Today {a} {rng.choice(_VERBS_S)} {rng.choice(_THINGS)}, and {b} {rng.choice(_VERBS_S)} "
            f"{rng.choice(_THINGS)}.",
        ]))
    return docs


def chats(seed: int, count: int = 1500) -> list[list[dict]]:
    rng = random.Random(seed + 1)
    return [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for q, a in (rng.choice(_QA) for _ in range(count))
    ]


def build_tokenizer(texts: list[str], vocab: int) -> "PreTrainedTokenizerFast":
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _examples(tokenizer: "PreTrainedTokenizerFast", seed: int) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    docs = [tokenizer(t)["input_ids"] + [eos] for t in corpus(seed)]
    docs += [tokenizer.apply_chat_template(c, tokenize=True, return_dict=False) for c in chats(seed)]
    return docs


def _packed(docs: list[list[int]], seq_len: int, seed: int):
    import torch

    stream = [t for d in random.Random(seed).sample(docs, len(docs)) for t in d]
    usable = len(stream) // seq_len * seq_len
    return torch.tensor(stream[:usable]).view(-1, seq_len)


def build(out: Path, preset: str = "demo", seed: int = 0, steps: int | None = None,
          log: Callable[[str], object] = print) -> Path:
    """Trains the preset briefly on generated text and writes a HF model directory to `out` atomically."""
    import torch

    p = PRESETS[preset]
    random.seed(seed)
    torch.manual_seed(seed)
    texts = corpus(seed) + [m["content"] for c in chats(seed) for m in c]
    tokenizer = build_tokenizer(texts, p.vocab)
    model = _model(p, tokenizer)
    _train(model, _packed(_examples(tokenizer, seed), seq_len=128, seed=seed), p.steps if steps is None else steps,
           seed, log)
    return _save(model, tokenizer, Path(out))


def _model(p: "Preset", tokenizer: "PreTrainedTokenizerFast") -> "LlamaForCausalLM":
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=p.hidden, intermediate_size=p.intermediate,
        num_hidden_layers=p.layers, num_attention_heads=p.heads, num_key_value_heads=p.heads,
        head_dim=p.hidden // p.heads, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def _train(model: "LlamaForCausalLM", data: "torch.Tensor", steps: int, seed: int,
           log: Callable[[str], object]) -> None:
    import torch

    batch = 16
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(data), (batch,), generator=gen)
        loss = model(input_ids=data[idx], labels=data[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step + 1}/{steps} loss {loss.item():.3f}")
    model.eval()


def _readable_by_all(directory: Path) -> None:
    """0755 and 0644 (mkdtemp makes 0700): a model built on the host is mounted into the image, whose user differs."""
    directory.chmod(0o755)
    for f in directory.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)


def _save(model: "LlamaForCausalLM", tokenizer: "PreTrainedTokenizerFast", out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        _readable_by_all(staging)
        if out.exists():
            shutil.rmtree(out)
        os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
