"""vLLM's CPU LoRA ops (a weight gather per token) against grouping tokens by adapter with one bmm.

    python -m loadtest.lora_ops_bench
"""

import time

import torch
from vllm.lora.ops.torch_ops import bgmv_expand_slice, bgmv_shrink

SLOTS, RANK, HIDDEN = 32, 16, 512


def _ms(fn, n: int = 100) -> float:
    for _ in range(5):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1000


def _grouped_bmm(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor):
    """x @ weights[idx[t]].T for every token t, as one bmm over the distinct adapters, padded per group."""
    order = torch.argsort(idx, stable=True)
    uniq, counts = torch.unique_consecutive(idx[order], return_counts=True)
    group = torch.repeat_interleave(torch.arange(uniq.numel()), counts)
    pos = torch.arange(idx.numel()) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    padded = x.new_zeros(uniq.numel(), int(counts.max()), x.shape[1])
    padded[group, pos] = x[order]
    out = torch.bmm(padded, weights[uniq].squeeze(1).transpose(1, 2))
    return order, out[group, pos]


def grouped_shrink(x, a, y, idx, scale):
    order, out = _grouped_bmm(x, a, idx)
    y[order, :out.shape[1]] = scale * out


def grouped_expand_slice(x, b, y, idx, offset, size, add):
    order, out = _grouped_bmm(x, b, idx)
    if add:
        y[order, offset:offset + size] += out
    else:
        y[order, offset:offset + size] = out


def main() -> None:
    torch.manual_seed(0)
    print(f"{SLOTS} slots of rank {RANK}, hidden {HIDDEN}, {torch.get_num_threads()} threads")
    print("| tokens | adapters in batch | shrink, vLLM / grouped (ms) | expand to 1408, vLLM / grouped (ms) |")
    print("|---|---|---|---|")
    for tokens, adapters in ((32, 15), (300, 15), (600, 20)):
        idx = torch.randint(0, adapters, (tokens,))
        x, a = torch.randn(tokens, HIDDEN), torch.randn(SLOTS, 1, RANK, HIDDEN)
        y1, y2 = torch.zeros(tokens, RANK), torch.zeros(tokens, RANK)
        bgmv_shrink(x, a, y1, idx, 0.5)
        grouped_shrink(x, a, y2, idx, 0.5)
        torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-4)
        shrink = (_ms(lambda: bgmv_shrink(x, a, y1, idx, 1.0)), _ms(lambda: grouped_shrink(x, a, y2, idx, 1.0)))
        xr, b = torch.randn(tokens, RANK), torch.randn(SLOTS, 1, 1408, RANK)
        o1, o2 = torch.zeros(tokens, 1508), torch.zeros(tokens, 1508)
        bgmv_expand_slice(xr, b, o1, idx, 50, 1408, True)
        grouped_expand_slice(xr, b, o2, idx, 50, 1408, True)
        torch.testing.assert_close(o1, o2, rtol=1e-4, atol=1e-3)
        expand = (_ms(lambda: bgmv_expand_slice(xr, b, o1, idx, 50, 1408, True)),
                  _ms(lambda: grouped_expand_slice(xr, b, o2, idx, 50, 1408, True)))
        print(f"| {tokens} | {adapters} | {shrink[0]:.2f} / {shrink[1]:.2f} | {expand[0]:.2f} / {expand[1]:.2f} |")


if __name__ == "__main__":
    main()
