"""Rank concatenation is exact: the composed update of every module is the weighted sum of the sources' updates,
and served through PEFT it answers as PEFT's own `cat` combination."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from server.weights.compose import ComposeError, Source, concatenate, read_tensors, updates, write

# name: (r, alpha, rsLoRA, targets); different ranks, alphas and target sets, one rsLoRA source not first.
SOURCES = {
    "a": (4, 8, False, ["q_proj", "v_proj"]),
    "b": (2, 3, True, ["v_proj", "up_proj"]),
    "c": (6, 6, False, ["q_proj", "down_proj"]),
}
WEIGHTS = {"a": 0.7, "b": -0.3, "c": 0.45}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A one-layer Llama and the three adapters, written by PEFT with random A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("compose")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    adapters = {}
    for name, (r, alpha, rslora, targets) in SOURCES.items():
        model = LlamaForCausalLM.from_pretrained(root / "base")
        peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets,
                                                init_lora_weights=False, task_type="CAUSAL_LM"))
        peft.save_pretrained(root / name)
        adapters[name] = root / name
    return root / "base", adapters


def delta(directory: Path) -> dict[str, np.ndarray]:
    """Each module's B A times the adapter's scaling, as PEFT applies it."""
    return {m: b @ a for m, (a, b) in updates(Source(directory, 1.0, directory.name)).items()}


def test_composed_update_is_the_weighted_sum_of_the_sources_updates(tiny, tmp_path):
    _, adapters = tiny
    sources = [Source(adapters[n], WEIGHTS[n], n) for n in SOURCES]
    write(sources, tmp_path, max_rank=16)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (12, 12, False)
    assert config["target_modules"] == ["down_proj", "q_proj", "up_proj", "v_proj"]
    composed = delta(tmp_path)
    expected: dict[str, np.ndarray] = {}
    for name in SOURCES:
        for module, d in delta(adapters[name]).items():
            expected[module] = expected.get(module, 0) + WEIGHTS[name] * d
    assert composed.keys() == expected.keys() and len(composed) == 8  # 4 target kinds in 2 layers
    for module in expected:
        assert np.abs(composed[module] - expected[module]).max() <= 1e-6, module


def test_rslora_scaling_is_alpha_over_root_rank(tiny):
    _, adapters = tiny
    module = next(iter(updates(Source(adapters["b"], 1.0, "b"))))
    tensors = read_tensors(adapters["b"] / "adapter_model.safetensors")
    a = tensors[f"base_model.model.{module}.lora_A.weight"]
    scaled, _ = updates(Source(adapters["b"], 1.0, "b"))[module]
    np.testing.assert_allclose(scaled, a * 3 / np.sqrt(2), rtol=1e-6)


def test_served_through_peft_it_answers_as_peft_cat_combination(tiny, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base, adapters = tiny
    order = ["a", "b", "c"]  # PEFT copies the first source's config: a non-rsLoRA one, as README says
    write([Source(adapters[n], WEIGHTS[n], n) for n in order], tmp_path, max_rank=16)
    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapters["a"], adapter_name="a")
    for name in order[1:]:
        peft.load_adapter(adapters[name], adapter_name=name)
    peft.add_weighted_adapter(order, [WEIGHTS[n] for n in order], "cat", combination_type="cat")
    peft.set_adapter("cat")
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        theirs = peft(input_ids=ids).logits
        ours = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), tmp_path)(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_bf16_and_f16_are_widened_exactly(tmp_path):
    from safetensors.torch import save_file

    values = torch.tensor([[1.5, -2.25], [0.0078125, 3.0]])
    save_file({"x": values.bfloat16(), "y": values.half()}, tmp_path / "t.safetensors")
    read = read_tensors(tmp_path / "t.safetensors")
    np.testing.assert_array_equal(read["x"], values.numpy())
    np.testing.assert_array_equal(read["y"], values.numpy())


def test_over_rank_is_refused_naming_each_source(tiny):
    _, adapters = tiny
    with pytest.raises(ComposeError, match=r"composed rank 10 = a \(rank 4\) \+ c \(rank 6\) exceeds MAX_LORA_RANK 8"):
        concatenate([Source(adapters["a"], 1, "a"), Source(adapters["c"], 1, "c")], max_rank=8)


def test_dora_source_is_refused(tiny, tmp_path):
    _, adapters = tiny
    (tmp_path / "adapter_model.safetensors").write_bytes((adapters["a"] / "adapter_model.safetensors").read_bytes())
    config = json.loads((adapters["a"] / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ComposeError, match="DoRA"):
        concatenate([Source(tmp_path, 1, "d")], max_rank=16)
