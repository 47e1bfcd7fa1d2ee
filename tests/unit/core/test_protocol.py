"""Every request field is bounded: an out-of-range value is a 400 naming the field, before any engine work."""

import pytest

from server.core.protocol import MAX_MESSAGES, MAX_PROMPTS, MAX_STOP_CHARS, MAX_STOPS, MAX_TEXT_CHARS

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1)}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * (MAX_TEXT_CHARS + 1)}]},
     "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {**CHAT, "stop": ["a"] * (MAX_STOPS + 1)}, "stop"),
    ("/v1/chat/completions", {**CHAT, "stop": "s" * (MAX_STOP_CHARS + 1)}, "stop"),
    ("/v1/chat/completions", {**CHAT, "stop": [""]}, "stop"),
    ("/v1/chat/completions", {**CHAT, "n": 17}, "n"),
    ("/v1/chat/completions", {**CHAT, "n": 0}, "n"),
    ("/v1/chat/completions", {**CHAT, "temperature": 2.5}, "temperature"),
    ("/v1/chat/completions", {**CHAT, "temperature": -0.1}, "temperature"),
    ("/v1/chat/completions", {**CHAT, "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {**CHAT, "top_p": 1.01}, "top_p"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 2**64}, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "seed": 2**64}, "seed"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 3}, "presence_penalty"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "adapter": "a" * 257}, "adapter"),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage"),
    ("/v1/completions", {"prompt": ["x"] * (MAX_PROMPTS + 1)}, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "model": "m" * 257}, "model"),
    ("/v1/completions", {}, "prompt"),
])
def test_out_of_range_fields_are_400_naming_the_field(client, path, body, param):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"].startswith(param), error
    assert error["type"] == "invalid_request_error"