"""Grouped LoRA ops for vLLM's CPU backend, installed into the engine as a vLLM general plugin.

vLLM's CPU ops copy every token's adapter matrices before an einsum; at 64 adapters that copy was 42% of the
engine's time (BENCHMARKS.md). These sort the batch's tokens by adapter slot once per step and hand the
stacked slot weights, uncopied, to one grouped matmul per call. Same signatures as
`vllm.lora.ops.torch_ops.sgmv_*`; slot -1 means no LoRA, as vLLM documents.
"""

import os
from typing import NamedTuple

import torch

from server.core.config import LORA_OPS_ENV


class Plan(NamedTuple):
    """The LoRA tokens grouped by slot."""

    order: torch.Tensor  # token rows, grouped by slot; tokens without LoRA left out
    slots: torch.Tensor  # slot of each token in `order`
    offs: torch.Tensor  # int32 end of each slot's group in `order`, for every slot (empty groups included)
    single: int | None  # the slot, when every LoRA token uses the same one


def plan(token_slots: torch.Tensor, slots: int) -> Plan:
    order = torch.argsort(token_slots, stable=True)
    order = order[token_slots[order] >= 0]
    ordered = token_slots[order]
    counts = torch.bincount(ordered, minlength=slots)
    present = counts.nonzero()
    single = int(present[0]) if present.numel() == 1 else None
    return Plan(order, ordered, torch.cumsum(counts, 0, dtype=torch.int32), single)


class _StepCache:
    """Every LoRA layer of one forward step sees the same metadata; plan it once per step, not 100 times."""

    def __init__(self):
        self.key, self.plan = None, None

    def get(self, seq_lens: torch.Tensor, slots: torch.Tensor, batches: int, token_nums: int, n_slots: int) -> Plan:
        # vLLM refills these buffers in place each step, which bumps their version counters.
        key = (slots.data_ptr(), slots._version, seq_lens.data_ptr(), seq_lens._version, batches, token_nums,
               n_slots)
        if key != self.key:
            self.key, self.plan = key, plan(torch.repeat_interleave(slots, seq_lens), n_slots)
        return self.plan


_cache = _StepCache()


def _stacked(weights: torch.Tensor) -> torch.Tensor:
    """vLLM's stacked LoRA weights as (slot, out, in)."""
    return weights.squeeze(1) if weights.dim() == 4 else weights


def _apply(p: Plan, x: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x[t] @ weights[slot(t)].T for the planned tokens, in `order`, computed in the weights' dtype.

    The grouped matmul reads each slot's weights in place: gathering them first (one copy per group and layer)
    was most of the LoRA time with many adapters in a batch (BENCHMARKS.md)."""
    rows = x[p.order].to(weights.dtype)
    if p.single is not None:
        out = rows @ weights[p.single].T
    elif weights.shape[2] * weights.element_size() % 16 == 0:
        out = torch._grouped_mm(rows, weights.transpose(1, 2), offs=p.offs)
    else:  # the grouped matmul wants rows of 16-byte multiples: rank 1, or an odd width in half precision
        out = torch.bmm(rows.unsqueeze(1), weights[p.slots].transpose(1, 2)).squeeze(1)
    return out.to(dtype)


def _grouped(inputs: torch.Tensor, stacked: torch.Tensor, seq_lens: torch.Tensor, slots: torch.Tensor, batches: int,
             token_nums: int, dtype: torch.dtype) -> tuple[Plan, torch.Tensor] | None:
    """The step's plan and the LoRA tokens' products in its order; None when no token uses LoRA."""
    weights = _stacked(stacked)
    p = _cache.get(seq_lens, slots, batches, token_nums, weights.shape[0])
    return (p, _apply(p, inputs, weights, dtype)) if p.order.numel() else None


def _write(y: torch.Tensor, rows: torch.Tensor, cols: slice, out: torch.Tensor, add: bool) -> None:
    if add:
        y[rows, cols] += out
    else:
        y[rows, cols] = out


def sgmv_shrink(inputs: torch.Tensor, lora_a_weights: torch.Tensor, output_tensor: torch.Tensor,
                b_seq_start_loc: torch.Tensor, seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor,
                batches: int, max_seq_length: int, token_nums: int, scaling: float) -> None:
    done = _grouped(inputs, lora_a_weights, seq_len_tensor, lora_indices_tensor, batches, token_nums,
                    output_tensor.dtype)
    if done:
        p, out = done
        _write(output_tensor, p.order, slice(0, out.shape[1]), scaling * out, add=False)


def sgmv_expand(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                b_seq_start_loc: torch.Tensor, seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor,
                batches: int, max_seq_length: int, token_nums: int, add_inputs: bool = False) -> None:
    done = _grouped(inputs, lora_b_weights, seq_len_tensor, lora_indices_tensor, batches, token_nums,
                    output_tensor.dtype)
    if done:
        p, out = done
        # the adapter and the model may pad the output differently
        common = min(out.shape[1], output_tensor.shape[1])
        _write(output_tensor, p.order, slice(0, common), out[:, :common], add_inputs)


def sgmv_expand_slice(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                      b_seq_start_loc: torch.Tensor, seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor,
                      batches: int, max_seq_length: int, token_nums: int, slice_offset: int, slice_size: int,
                      add_inputs: bool = False) -> None:
    done = _grouped(inputs, lora_b_weights, seq_len_tensor, lora_indices_tensor, batches, token_nums,
                    output_tensor.dtype)
    if done:
        p, out = done
        _write(output_tensor, p.order, slice(slice_offset, slice_offset + slice_size), out, add_inputs)


def register() -> None:
    """vLLM general-plugin hook: swaps the CPU punica wrapper's SGMV ops when the engine was started with
    LORAPLEX_LORA_OPS=grouped (the gateway passes its setting to the engines it spawns)."""
    if os.environ.get(LORA_OPS_ENV) != "grouped":
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.logger import init_logger
    from vllm.lora.punica_wrapper import punica_cpu

    punica_cpu.sgmv_shrink = sgmv_shrink
    punica_cpu.sgmv_expand = sgmv_expand
    punica_cpu.sgmv_expand_slice = sgmv_expand_slice
    init_logger("vllm.loraplex").info("loraplex grouped LoRA ops in use (%s=grouped)", LORA_OPS_ENV)
