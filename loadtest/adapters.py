"""Many PEFT LoRA adapters with random weights, fast: the base is wrapped by PEFT once and re-seeded per adapter."""

from pathlib import Path

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class AdapterFactory:
    """Writes adapters of one rank and target set; each seed gives different weights."""

    def __init__(self, base_dir: Path, rank: int = 8, targets: list[str] | None = None, scale: float = 1.0):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        self.torch, self.rank, self.scale = torch, rank, scale
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets or ALL_LINEAR,
                            init_lora_weights=False, lora_dropout=0.0, task_type="CAUSAL_LM")
        self.model = get_peft_model(model, config)
        self.model.peft_config["default"].base_model_name_or_path = str(base_dir)

    def write(self, out: Path, seed: int) -> Path:
        torch = self.torch
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * self.scale / self.rank ** 0.5)
        self.model.save_pretrained(out, safe_serialization=True)
        return Path(out)

