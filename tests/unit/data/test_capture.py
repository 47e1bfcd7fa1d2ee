"""The pure parts of capture: streams assembled into the document a non-streamed request gets, redaction, the
data policy's rules, and the writer that never blocks."""

import json
import threading

import pytest
from pydantic import ValidationError

from server.data.assembly import assemble
from server.data.policy import DataPolicy
from server.data.records import LedgerEntry, new_answer_id
from server.data.redaction import redact
from server.data.writer import RecordWriter


def event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode()


def test_a_chat_stream_assembles_into_the_completion_it_streamed():
    head = {"id": "chatcmpl-1", "created": 5, "model": "a@1"}
    events = [event({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
              event({**head, "choices": [{"index": 0, "delta": {"content": "Hel"}}, {"index": 1, "delta": {
                  "role": "assistant", "tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f",
                                                                                            "arguments": "{\"a\""}}]}}]}),
              event({**head, "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"},
                                         {"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {
                                             "arguments": ": 1}"}}]}, "finish_reason": "tool_calls"}]}),
              event({**head, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}),
              b"data: [DONE]"]
    doc = assemble(events, chat=True)
    assert doc["object"] == "chat.completion" and doc["id"] == "chatcmpl-1" and doc["model"] == "a@1"
    assert doc["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": "Hello"},
                                 "finish_reason": "stop"}
    call = doc["choices"][1]["message"]["tool_calls"][0]
    assert call == {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}
    assert doc["usage"] == {"prompt_tokens": 3, "completion_tokens": 2}


def test_a_completion_stream_assembles_its_text():
    events = [event({"id": "cmpl-1", "choices": [{"index": 0, "text": "a"}]}) + b"\n\n"
              + event({"id": "cmpl-1", "choices": [{"index": 0, "text": "b", "finish_reason": "length"}]})]
    doc = assemble(events, chat=False)
    assert doc["object"] == "text_completion" and doc["choices"] == [{"index": 0, "text": "ab",
                                                                      "finish_reason": "length"}]


@pytest.mark.parametrize("text, names, expected", [
    ("write to ana.b+x@mail.example.org today", ["email"], "write to [email] today"),
    ("call +1 (415) 555-0133 or 020 7946 0958", ["phone"], "call [phone] or [phone]"),
    ("on 2024-01-05 order 55 of 12 items", ["phone", "email"], "on 2024-01-05 order 55 of 12 items"),
    ("ana@example.com", [], "ana@example.com"),
])
def test_redaction_replaces_the_named_patterns_only(text, names, expected):
    assert redact({"messages": [{"content": text}], "n": 1}, names) == {"messages": [{"content": expected}], "n": 1}


@pytest.mark.parametrize("capture, store, stored", [
    ("off", True, False), ("off", None, False), ("opt-in", None, False), ("opt-in", True, True),
    ("opt-in", False, False), ("on", None, True), ("on", True, True), ("on", False, False),
])
def test_the_policy_stores_only_what_the_tenant_allows(capture, store, stored):
    assert DataPolicy(capture=capture).stores(store) is stored


def test_a_bad_policy_is_refused_naming_the_field():
    for bad in ({"capture": "always"}, {"retention": "forever"}, {"retention": "0d"}, {"redact": ["ssn"]}):
        with pytest.raises(ValidationError) as e:
            DataPolicy(**bad)
        assert e.value.errors()[0]["loc"][0] == next(iter(bad))


def test_answer_ids_sort_by_time_and_are_unique():
    ids = [new_answer_id() for _ in range(2000)]
    assert len(set(ids)) == 2000 and ids == sorted(ids, key=lambda i: i[:11])


class SlowStore:
    def __init__(self):
        self.release, self.batches = threading.Event(), []

    def add(self, records, ledger):
        self.release.wait(10)
        self.batches.append((list(records), list(ledger)))


class Noted:
    def __init__(self, n: int):
        self.ledger = LedgerEntry(f"cmpl-{n}", "t", None, None, 0.0)

    def record(self):
        return None


def test_the_writer_never_blocks_and_counts_what_it_drops():
    store, dropped = SlowStore(), []
    writer = RecordWriter(store, capacity=4, dropped=dropped.append)
    for n in range(20):  # the first is taken by the (stuck) writer thread, 4 queue, the rest are dropped
        writer.put(Noted(n))
    store.release.set()
    writer.close()
    written = sum(len(ledger) for _, ledger in store.batches)
    assert written + sum(dropped) == 20 and 4 <= written <= 5
