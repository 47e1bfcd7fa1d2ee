"""An answer as the caller received it, as one document: a stream's server-sent events assembled into the
completion a non-streamed request would have answered (text and message content concatenated, tool calls joined,
the last finish reason and the final usage kept)."""

import json


def assemble(events: list[bytes], chat: bool) -> dict | None:
    """The completion document of a stream's `data:` events; None when it holds none."""
    head: dict | None = None
    choices: dict[int, dict] = {}
    usage = None
    for event in events:
        for line in event.split(b"\n"):
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            head = head or chunk
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                _merge(choices.setdefault(choice.get("index", 0), _empty(chat)), choice, chat)
    if head is None:
        return None
    kind = "chat.completion" if chat else "text_completion"
    return {"id": head.get("id"), "object": kind, "created": head.get("created"), "model": head.get("model"),
            "choices": [{"index": i, **choices[i]} for i in sorted(choices)], "usage": usage}


def _empty(chat: bool) -> dict:
    if chat:
        return {"message": {"role": "assistant", "content": None}, "finish_reason": None}
    return {"text": "", "finish_reason": None}


def _merge(into: dict, choice: dict, chat: bool) -> None:
    into["finish_reason"] = choice.get("finish_reason") or into["finish_reason"]
    if not chat:
        into["text"] += choice.get("text") or ""
        return
    delta, message = choice.get("delta") or {}, into["message"]
    message["role"] = delta.get("role") or message["role"]
    if delta.get("content") is not None:
        message["content"] = (message["content"] or "") + delta["content"]
    for call in delta.get("tool_calls") or []:
        _merge_call(message.setdefault("tool_calls", []), call)


def _merge_call(calls: list[dict], part: dict) -> None:
    """A streamed tool call comes in parts of one index: id, type and name once, the arguments in pieces."""
    index = part.get("index", 0)
    while len(calls) <= index:
        calls.append({"id": None, "type": "function", "function": {"name": None, "arguments": ""}})
    call, function = calls[index], part.get("function") or {}
    call["id"] = part.get("id") or call["id"]
    call["function"]["name"] = function.get("name") or call["function"]["name"]
    call["function"]["arguments"] += function.get("arguments") or ""
