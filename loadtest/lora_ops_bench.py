"""vLLM's CPU SGMV ops (a weight copy per token) against loraplex's grouped ops (server/vllm_plugins/lora_ops.py), side by side.

    python -m loadtest.lora_ops_bench
"""

import time

import torch
from vllm.lora.ops import torch_ops as vllm_ops

from server.vllm_plugins import lora_ops

SLOTS, RANK, HIDDEN, OUT = 32, 16, 512, 1408
# (sequences in the step, tokens each of those still in prefill, sequences in prefill, distinct adapters)
STEPS = ((32, 1, 0, 15), (32, 64, 4, 15), (32, 128, 4, 20), (32, 256, 2, 20))


def _ms(fn, n: int = 50) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1000


def step_metadata(seqs: int, prefill_len: int, prefills: int, adapters: int, gen: torch.Generator):
    """SGMV metadata as vLLM builds it: runs of consecutive tokens that share a slot; one slot in 8 is no LoRA."""
    lens = torch.tensor([prefill_len] * prefills + [1] * (seqs - prefills))
    slots = torch.randint(0, adapters, (seqs,), generator=gen)
    slots[torch.rand(seqs, generator=gen) < 0.125] = -1
    token_slots = torch.repeat_interleave(slots, lens)
    run_slots, run_lens = torch.unique_consecutive(token_slots, return_counts=True)
    starts = torch.cumsum(run_lens, 0) - run_lens
    return (starts, run_lens, run_slots, run_slots.numel(), int(run_lens.max()), int(run_lens.sum())), token_slots


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    print(f"{SLOTS} slots of rank {RANK}, hidden {HIDDEN}, {torch.get_num_threads()} threads; "
          "times per op call, ms, vLLM / grouped")
    print("| tokens in step | adapters | shrink | expand_slice to 1408 | planning, once per step |")
    print("|---|---|---|---|---|")
    for seqs, prefill_len, prefills, adapters in STEPS:
        meta, token_slots = step_metadata(seqs, prefill_len, prefills, adapters, gen)
        tokens = meta[-1]
        x, a = torch.randn(tokens, HIDDEN, generator=gen), torch.randn(SLOTS, 1, RANK, HIDDEN, generator=gen)
        xr, b = torch.randn(tokens, RANK, generator=gen), torch.randn(SLOTS, 1, OUT, RANK, generator=gen)
        lora = token_slots >= 0

        y1, y2 = torch.zeros(tokens, RANK), torch.zeros(tokens, RANK)
        vllm_ops.sgmv_shrink(x, a, y1, *meta, 0.5)
        lora_ops.sgmv_shrink(x, a, y2, *meta, 0.5)
        torch.testing.assert_close(y1[lora], y2[lora], rtol=1e-4, atol=1e-4)
        o1, o2 = torch.zeros(tokens, OUT + 100), torch.zeros(tokens, OUT + 100)
        vllm_ops.sgmv_expand_slice(xr, b, o1, *meta, 50, OUT, True)
        lora_ops.sgmv_expand_slice(xr, b, o2, *meta, 50, OUT, True)
        torch.testing.assert_close(o1[lora], o2[lora], rtol=1e-5, atol=1e-4)
        assert not o2[~lora].any(), "a token without LoRA got an adapter's output"

        shrink = (_ms(lambda: vllm_ops.sgmv_shrink(x, a, y1, *meta, 1.0)),
                  _ms(lambda: lora_ops.sgmv_shrink(x, a, y2, *meta, 1.0)))
        expand = (_ms(lambda: vllm_ops.sgmv_expand_slice(xr, b, o1, *meta, 50, OUT, True)),
                  _ms(lambda: lora_ops.sgmv_expand_slice(xr, b, o2, *meta, 50, OUT, True)))
        planning = _ms(lambda: lora_ops.plan(token_slots, SLOTS))
        print(f"| {tokens} | {adapters} | {shrink[0]:.2f} / {shrink[1]:.2f} | {expand[0]:.2f} / {expand[1]:.2f} "
              f"| {planning:.2f} |")


if __name__ == "__main__":
    main()
