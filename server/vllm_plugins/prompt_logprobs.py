"""Prompt logprobs with LoRA on vLLM's CPU backend, fixed in the engine as a vLLM general plugin.

vLLM computes prompt logprobs with one hidden-state row per prompt token, but its LoRA logits layer indexes the
adapters with one slot per request (`sampler_indices`). With two requests in a batch the shapes clash and the
worker raises, which kills the whole engine (vLLM issues 29955, 16668): any caller sending `prompt_logprobs` with
an adapter could take the engine down, and `loraplex eval` needs them. While vLLM computes one request's prompt
logits, this hands the LoRA layer that request's tokens' slots instead, which is what it should have used.
"""

from collections.abc import Callable
from typing import Any

# Rows [start, stop) of the batch whose prompt logits are being computed; None outside that call. An engine worker
# runs its steps on one thread.
_window: tuple[int, int] | None = None


def _per_token(sampler_indices: property) -> property:
    def indices(self: Any) -> Any:
        if _window is None:
            return sampler_indices.fget(self)
        return self.token_lora_indices[_window[0]:_window[1]]

    return property(indices)


def _with_windows(original: Callable) -> Callable:
    def get_prompt_logprobs_dict(self: Any, hidden_states: Any, num_scheduled_tokens: Any) -> Any:
        model = self.model
        compute_logits = model.compute_logits
        row_bytes = hidden_states.stride(0) * hidden_states.element_size()

        def windowed(prompt_hidden_states: Any) -> Any:
            """vLLM passes a slice of `hidden_states`: where it starts says which rows, hence which tokens."""
            global _window
            start = (prompt_hidden_states.data_ptr() - hidden_states.data_ptr()) // row_bytes
            _window = (start, start + prompt_hidden_states.shape[0])
            try:
                return compute_logits(prompt_hidden_states)
            finally:
                _window = None

        model.compute_logits = windowed
        try:
            return original(self, hidden_states, num_scheduled_tokens)
        finally:
            del model.compute_logits

    get_prompt_logprobs_dict.loraplex = True
    return get_prompt_logprobs_dict


def register() -> None:
    """vLLM general-plugin hook (every engine process): installs the fix on the CPU backend."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner._get_prompt_logprobs_dict, "loraplex", False):
        return
    PunicaWrapperBase.sampler_indices = _per_token(PunicaWrapperBase.sampler_indices)
    GPUModelRunner._get_prompt_logprobs_dict = _with_windows(GPUModelRunner._get_prompt_logprobs_dict)
