"""Mutated weight files: every one is refused with InvalidAdapter (a 400 upstream), never another exception."""

import json
import random
import struct

import pytest
import torch

from server.registry.validation import InvalidAdapter, check_adapter

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def with_header(data: bytes, header) -> bytes:
    """Replaces the JSON header of a safetensors file, keeping its tensor bytes."""
    (size,) = struct.unpack("<Q", data[:8])
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw)) + raw + data[8 + size:]


def header_of(data: bytes) -> dict:
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + size])


def test_named_corruptions(base, adapter_factory):
    good = adapter_factory()
    weights = good / "adapter_model.safetensors"
    data = weights.read_bytes()
    h = header_of(data)
    cases = {
        "inf values": None,
        "int dtype": None,
        "float64 dtype": None,
        "huge header size": struct.pack("<Q", 1 << 40) + data[8:],
        "header not json": with_header(data, b"{not json" + b" " * 20),
        "header is a list": with_header(data, [1, 2]),
        "tensor meta not an object": with_header(data, {**h, A: "x"}),
        "tensor without shape": with_header(data, {**h, A: {"dtype": "F32", "data_offsets": h[A]["data_offsets"]}}),
        "offsets past the end": with_header(data, {**h, A: {**h[A], "data_offsets": [0, 10**9]}}),
        "offsets overlap": with_header(data, {**h, B: {**h[B], "data_offsets": h[A]["data_offsets"]}}),
        "shape is not a list": with_header(data, {**h, A: {**h[A], "shape": "4x8"}}),
        "truncated tensor data": data[:-7],
        "empty file": b"",
    }
    for name in ("inf values", "int dtype", "float64 dtype"):
        tensors = {A: torch.randn(4, 8), B: torch.randn(8, 4)}
        if name == "inf values":
            tensors[B][0, 0] = float("inf")
        else:
            tensors = {k: v.to(torch.int32 if name == "int dtype" else torch.float64) for k, v in tensors.items()}
        path = adapter_factory(tensors=tensors) / "adapter_model.safetensors"
        cases[name] = path.read_bytes()
    for name, mutated in cases.items():
        weights.write_bytes(mutated)
        with pytest.raises(InvalidAdapter):
            check_adapter(good, base, 64)
            pytest.fail(f"{name}: accepted")


def test_random_truncations_and_header_bytes(base, adapter_factory):
    good = adapter_factory()
    weights = good / "adapter_model.safetensors"
    data = weights.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    rng = random.Random(1234)
    for i in range(300):
        mutated = bytearray(data)
        if i % 2:
            mutated = mutated[:rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 4)):
                mutated[rng.randrange(8 + size)] = rng.randrange(256)
        weights.write_bytes(bytes(mutated))
        try:
            check_adapter(good, base, 64)
        except InvalidAdapter:
            continue
        # A flip that leaves a valid header (a digit in an unused metadata field, say) may be accepted, but
        # only as the same well-formed tensors.
        assert bytes(mutated[8 + size:]) == data[8 + size:], f"mutation {i} accepted with other tensor bytes"
