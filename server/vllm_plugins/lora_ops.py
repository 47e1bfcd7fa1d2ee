"""Grouped LoRA ops for vLLM's CPU backend, installed into the engine as a vLLM general plugin.

vLLM's CPU ops copy every token's adapter matrices before an einsum; at 64 adapters that copy was 42% of the
engine's time (BENCHMARKS.md). These group the batch's tokens by adapter slot once per step and read each
slot's weights once per group. Same signatures as `vllm.lora.ops.torch_ops.sgmv_*`; slot -1 means no LoRA,
as vLLM documents.
"""

import os
from typing import NamedTuple

import torch

from server.core.config import LORA_OPS_ENV

# Groups of at most this many tokens (decode steps) share one padded bmm; longer ones (prefill) get an mm each,
# so that one long prefill does not pad every decode token's group to its length.
SHORT = 8


class Plan(NamedTuple):
    """The LoRA tokens grouped by slot, and how each group is computed."""

    order: torch.Tensor  # token rows, grouped by slot; tokens without LoRA left out
    short_rows: torch.Tensor  # positions in `order` of the tokens in short groups
    short_tokens: torch.Tensor  # the same tokens' rows in the batch (order[short_rows])
    short_slots: torch.Tensor  # slot of each short group
    short_group: torch.Tensor  # short group of each of those tokens
    short_pos: torch.Tensor  # position of each of those tokens within its group
    short_longest: int
    long: list[tuple[int, int, int]]  # (start, end) in `order` and slot of each long group


def plan(token_slots: torch.Tensor) -> Plan:
    order = torch.argsort(token_slots, stable=True)
    order = order[token_slots[order] >= 0]
    slots, counts = torch.unique_consecutive(token_slots[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    short = counts <= SHORT
    short_counts = counts[short]
    short_rows = torch.repeat_interleave(short, counts).nonzero().squeeze(1)
    group = torch.repeat_interleave(torch.arange(short_counts.numel()), short_counts)
    pos = torch.arange(short_rows.numel()) - torch.repeat_interleave(torch.cumsum(short_counts, 0) - short_counts,
                                                                     short_counts)
    long = [(st, st + n, slot) for st, n, slot, s in
            zip(starts.tolist(), counts.tolist(), slots.tolist(), short.tolist()) if not s]
    longest = int(short_counts.max()) if short_counts.numel() else 0
    return Plan(order, short_rows, order[short_rows], slots[short], group, pos, longest, long)


class _StepCache:
    """Every LoRA layer of one forward step sees the same metadata; plan it once per step, not 100 times."""

    def __init__(self):
        self.key, self.plan = None, None

    def get(self, seq_lens: torch.Tensor, slots: torch.Tensor, batches: int, token_nums: int) -> Plan:
        # vLLM refills these buffers in place each step, which bumps their version counters.
        key = (slots.data_ptr(), slots._version, seq_lens.data_ptr(), seq_lens._version, batches, token_nums)
        if key != self.key:
            self.key, self.plan = key, plan(torch.repeat_interleave(slots, seq_lens))
        return self.plan


_cache = _StepCache()


def _apply(p: Plan, x: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x[t] @ weights[slot(t)].T for the planned tokens, in `order`."""
    weights = weights.squeeze(1) if weights.dim() == 4 else weights
    out = x.new_empty(p.order.numel(), weights.shape[1], dtype=dtype)
    if p.short_longest:
        padded = x.new_zeros(p.short_slots.numel(), p.short_longest, x.shape[1], dtype=dtype)
        padded[p.short_group, p.short_pos] = x[p.short_tokens].to(dtype)
        w = weights[p.short_slots].to(dtype)
        out[p.short_rows] = torch.bmm(padded, w.transpose(1, 2))[p.short_group, p.short_pos]
    for start, end, slot in p.long:
        out[start:end] = x[p.order[start:end]].to(dtype) @ weights[slot].to(dtype).T
    return out


def _write(y: torch.Tensor, rows: torch.Tensor, cols: slice, out: torch.Tensor, add: bool) -> None:
    if add:
        y[rows, cols] += out
    else:
        y[rows, cols] = out


def sgmv_shrink(inputs: torch.Tensor, lora_a_weights: torch.Tensor, output_tensor: torch.Tensor,
                b_seq_start_loc: torch.Tensor, seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor,
                batches: int, max_seq_length: int, token_nums: int, scaling: float) -> None:
    p = _cache.get(seq_len_tensor, lora_indices_tensor, batches, token_nums)
    if p.order.numel():
        out = _apply(p, inputs, lora_a_weights, output_tensor.dtype)
        _write(output_tensor, p.order, slice(0, out.shape[1]), scaling * out, add=False)


def sgmv_expand(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                b_seq_start_loc: torch.Tensor, seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor,
                batches: int, max_seq_length: int, token_nums: int, add_inputs: bool = False) -> None:
    p = _cache.get(seq_len_tensor, lora_indices_tensor, batches, token_nums)
    if p.order.numel():
        out = _apply(p, inputs, lora_b_weights, output_tensor.dtype)
        # the adapter and the model may pad the output differently
        common = min(out.shape[1], output_tensor.shape[1])
        _write(output_tensor, p.order, slice(0, common), out[:, :common], add_inputs)


def sgmv_expand_slice(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                      b_seq_start_loc: torch.Tensor, seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor,
                      batches: int, max_seq_length: int, token_nums: int, slice_offset: int, slice_size: int,
                      add_inputs: bool = False) -> None:
    p = _cache.get(seq_len_tensor, lora_indices_tensor, batches, token_nums)
    if p.order.numel():
        out = _apply(p, inputs, lora_b_weights, output_tensor.dtype)
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
