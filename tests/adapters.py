"""Builds PEFT LoRA adapters with random non-zero weights for tests."""

from pathlib import Path


def make_adapter(base_dir: Path, out: Path, rank: int, targets: list[str], seed: int, scale: float = 1.0) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False,
                        lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * scale / rank ** 0.5)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out
