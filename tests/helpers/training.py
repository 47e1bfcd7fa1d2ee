"""The demo training data and a short QLoRA job on it."""

from pathlib import Path

import yaml

DEMO_DATA = Path(__file__).parents[2] / "examples" / "demo-support"


def write_job(tmp_path: Path, base_model: Path, name: str, **overrides) -> Path:
    """A short QLoRA job on the demo data (examples/demo-support), with any keys overridden."""
    job = {
        "base_model": str(base_model), "data": [str(DEMO_DATA / "support.jsonl")],
        "adapter": {"name": name, "tenant": "nimbus"}, "lora": {"r": 8, "alpha": 16},
        "quantization": "nf4", "max_steps": 30, "learning_rate": 1e-3, "batch_size": 8, "max_seq_len": 256,
        "eval_fraction": 0.15, "general_eval": str(DEMO_DATA / "general.txt"), "eval_generations": 2,
        "max_new_tokens": 8, "save_steps": 10, "output_dir": str(tmp_path / name), **overrides,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path
