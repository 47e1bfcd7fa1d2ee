import pytest
import torch
from vllm.lora.ops import torch_ops as vllm_ops
from vllm.lora.punica_wrapper import punica_cpu

from server.core.config import LORA_OPS_ENV
from server.vllm_plugins import lora_ops

SLOTS, RANK, HIDDEN, OUT = 6, 4, 24, 40


def metadata(run_slots: list[int], run_lens: list[int]):
    """SGMV metadata as vLLM's punica wrapper passes it, in fresh buffers."""
    slots, lens = torch.tensor(run_slots), torch.tensor(run_lens)
    return (torch.cumsum(lens, 0) - lens, lens, slots, len(run_slots), max(run_lens), sum(run_lens))


# decode (one token per sequence), prefill runs, a repeated slot in separate runs, no LoRA first / between / alone,
# long prefills beside decode tokens, one slot for every LoRA token (with and without tokens between)
CASES = [
    ([3, -1, 3], [4, 2, 1]),
    ([4], [6]),
    ([5, 0, 3, 5, 1, -1], [20, 1, 1, 1, 12, 9]),
    ([3, 0, 5, 1, 3], [1, 1, 1, 1, 1]),
    ([2, 4], [7, 3]),
    ([1, 2, 1, 0], [4, 1, 5, 2]),
    ([-1, 2, -1, 5], [3, 2, 1, 4]),
    ([-1], [5]),
]


@pytest.mark.parametrize("runs", CASES)
def test_grouped_ops_equal_vllms_on_lora_tokens_and_leave_the_rest(runs):
    g = torch.Generator().manual_seed(len(runs[1]))
    meta = metadata(*runs)
    tokens = meta[-1]
    lora = torch.repeat_interleave(meta[2], meta[1]) >= 0
    x, a = torch.randn(tokens, HIDDEN, generator=g), torch.randn(SLOTS, 1, RANK, HIDDEN, generator=g)
    xr, b = torch.randn(tokens, RANK, generator=g), torch.randn(SLOTS, 1, OUT, RANK, generator=g)
    start = torch.randn(tokens, OUT + 10, generator=g)

    mine, theirs = torch.zeros(tokens, RANK), torch.zeros(tokens, RANK)
    lora_ops.sgmv_shrink(x, a, mine, *meta, 0.5)
    vllm_ops.sgmv_shrink(x, a, theirs, *meta, 0.5)
    torch.testing.assert_close(mine[lora], theirs[lora])
    assert not mine[~lora].any()

    for add in (True, False):
        mine, theirs = start.clone(), start.clone()
        lora_ops.sgmv_expand_slice(xr, b, mine, *meta, 7, OUT, add)
        vllm_ops.sgmv_expand_slice(xr, b, theirs, *meta, 7, OUT, add)
        torch.testing.assert_close(mine[lora], theirs[lora])
        torch.testing.assert_close(mine[~lora], start[~lora], rtol=0, atol=0)

        mine, theirs = start.clone(), start.clone()
        lora_ops.sgmv_expand(xr, b, mine, *meta, add)
        vllm_ops.sgmv_expand(xr, b, theirs, *meta, add)
        torch.testing.assert_close(mine[lora], theirs[lora])
        torch.testing.assert_close(mine[~lora], start[~lora], rtol=0, atol=0)


def test_rank_one_slots_equal_vllms():
    """Rank 1 (a --max-lora-rank vLLM allows) makes 4-byte rows, which torch's grouped matmul refuses."""
    g = torch.Generator().manual_seed(3)
    meta = metadata([0, 2, 0, 5], [3, 1, 1, 2])
    xr, b = torch.randn(7, 1, generator=g), torch.randn(SLOTS, 1, OUT, 1, generator=g)
    mine, theirs = torch.zeros(7, OUT), torch.zeros(7, OUT)
    lora_ops.sgmv_expand(xr, b, mine, *meta, False)
    vllm_ops.sgmv_expand(xr, b, theirs, *meta, False)
    torch.testing.assert_close(mine, theirs)


def test_torchs_grouped_matmul_reads_slots_in_place_with_empty_groups():
    """Pins the private `torch._grouped_mm` as the ops use it on CPU: weights as a transposed view of every slot,
    groups given by their ends, empty groups allowed; a torch upgrade that changes it fails here."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(7, HIDDEN, generator=g), torch.randn(4, RANK, HIDDEN, generator=g)
    ends = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    out = torch._grouped_mm(x, w.transpose(1, 2), offs=ends)
    torch.testing.assert_close(out, torch.cat([x[:3] @ w[1].T, x[3:] @ w[3].T]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_into_a_float32_buffer(dtype):
    """vLLM's CPU wrapper shrinks into a float32 buffer whatever the model's dtype, and expands from it; the ops
    compute in the weights' dtype."""
    g = torch.Generator().manual_seed(2)
    meta = metadata([0, 2, 0, 5], [3, 1, 1, 2])
    x, a = torch.randn(7, HIDDEN, generator=g).to(dtype), torch.randn(SLOTS, 1, RANK, HIDDEN, generator=g).to(dtype)
    mine, theirs = torch.zeros(7, RANK), torch.zeros(7, RANK)
    lora_ops.sgmv_shrink(x, a, mine, *meta, 1.0)
    vllm_ops.sgmv_shrink(x, a, theirs, *meta, 1.0)
    torch.testing.assert_close(mine, theirs, rtol=2e-2, atol=2e-2)
    # and back: the float32 buffer expanded through the model's weights into its output
    b, start = torch.randn(SLOTS, 1, OUT, RANK, generator=g).to(dtype), torch.randn(7, OUT, generator=g).to(dtype)
    mine_out, theirs_out = start.clone(), start.clone()
    lora_ops.sgmv_expand(mine, b, mine_out, *meta, True)
    vllm_ops.sgmv_expand(theirs, b, theirs_out, *meta, True)
    torch.testing.assert_close(mine_out, theirs_out, rtol=5e-2, atol=5e-2)


def test_plan_follows_metadata_refilled_in_place():
    """vLLM reuses its metadata buffers from step to step; a cached plan must not outlive their contents."""
    slots, lens = torch.tensor([0, 1, 2]), torch.tensor([1, 1, 1])
    a = torch.randn(SLOTS, 1, RANK, HIDDEN)
    x = torch.randn(3, HIDDEN)
    first = torch.zeros(3, RANK)
    lora_ops.sgmv_shrink(x, a, first, torch.zeros(3), lens, slots, 3, 1, 3, 1.0)
    slots.copy_(torch.tensor([2, 2, 0]))
    second = torch.zeros(3, RANK)
    lora_ops.sgmv_shrink(x, a, second, torch.zeros(3), lens, slots, 3, 1, 3, 1.0)
    expected = torch.zeros(3, RANK)
    vllm_ops.sgmv_shrink(x, a, expected, torch.zeros(3), lens, slots, 3, 1, 3, 1.0)
    torch.testing.assert_close(second, expected)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("setting, ours", [("grouped", True), ("vllm", False), (None, False)])
def test_plugin_swaps_the_cpu_ops_only_when_asked(monkeypatch, setting, ours):
    for name in ("sgmv_shrink", "sgmv_expand", "sgmv_expand_slice"):
        monkeypatch.setattr(punica_cpu, name, getattr(vllm_ops, name))
    if setting is None:
        monkeypatch.delenv(LORA_OPS_ENV, raising=False)
    else:
        monkeypatch.setenv(LORA_OPS_ENV, setting)
    lora_ops.register()
    assert (punica_cpu.sgmv_shrink is lora_ops.sgmv_shrink) is ours
    assert (punica_cpu.sgmv_expand_slice is lora_ops.sgmv_expand_slice) is ours
    assert (punica_cpu.sgmv_expand is lora_ops.sgmv_expand) is ours
