"""The model a job trains, loaded as it is trained (4-bit NF4 or full precision), and its token counter."""

from typing import TYPE_CHECKING

from server.core.examples import Example
from server.trainer import data as datamod
from server.trainer.job import Job

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def count_tokens(tokenizer: "PreTrainedTokenizerBase") -> datamod.TokenCounter:
    """Token length of a row as it is trained: chat template applied, answer included."""
    def count(example: Example) -> int:
        return len(tokenizer.apply_chat_template(example.conversation(), tokenize=True, return_dict=False))

    return count


def release_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _compute_dtype():
    import torch

    # CPUs here have no fast bfloat16 path, and float32 matches what the CPU engine serves.
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def load_training_model(job: Job) -> "PreTrainedModel":
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = _compute_dtype()
    if job.quantization == "nf4":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
        return AutoModelForCausalLM.from_pretrained(job.base_model, quantization_config=quant, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(job.base_model, dtype=dtype)
