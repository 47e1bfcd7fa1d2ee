"""The requests the end-to-end tests send a running gateway, and the readings of its answers and metrics."""

import json
from dataclasses import dataclass

import httpx

PROMPTS = ["Ada and", "Today Chen", "The printer"]
CHATS = [
    [{"role": "user", "content": "How do I reset my password?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is my order?"}],
]
MAX_TOKENS = 16


@dataclass(frozen=True)
class Output:
    token_ids: list[int]
    text: str

    def matches(self, token_ids: list[int], text: str) -> bool:
        """Token for token; the text too, unless it ends in a partial UTF-8 character the engine holds back."""
        return token_ids == self.token_ids and (text == self.text or self.text.endswith("\ufffd"))


def complete(client: httpx.Client, prompt: str | list, max_tokens: int = MAX_TOKENS, **extra) -> dict:
    """A greedy completion with its token ids; asserts a 200."""
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                             "return_token_ids": True, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def chat(client: httpx.Client, messages: list[dict], max_tokens: int = MAX_TOKENS, **extra) -> dict:
    """A greedy chat completion with its token ids; asserts a 200."""
    r = client.post("/v1/chat/completions",
                    json={"messages": messages, "max_tokens": max_tokens, "temperature": 0,
                          "return_token_ids": True, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def same(choice: dict, expected: Output) -> bool:
    """Whether an answer's choice is the reference output, token for token."""
    text = choice["text"] if "text" in choice else choice["message"]["content"]
    return expected.matches(choice["token_ids"], text)


def streamed_text(client: httpx.Client, path: str, body: dict) -> str:
    """The text of a streamed answer; asserts it is server-sent events ending with [DONE]."""
    parts, done = [], False
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            choice = json.loads(line[6:])["choices"][0]
            parts.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    assert done, "stream did not end with data: [DONE]"
    return "".join(parts)


def upload(admin: httpx.Client, name: str, data: bytes, tenant: str = "acme", **fields: str) -> httpx.Response:
    """POST /admin/adapters of an archive."""
    return admin.post("/admin/adapters", data={"name": name, "tenant": tenant, **fields},
                      files={"file": (f"{name}.tar.gz", data)})


def series(text: str, name: str, **labels: str) -> list[float]:
    """Values of a Prometheus series with these labels, in the text format."""
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            out.append(float(line.rsplit(" ", 1)[1]))
    return out
