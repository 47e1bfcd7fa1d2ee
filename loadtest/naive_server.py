"""The baseline S-LoRA and Punica compare against: transformers + PEFT, one request at a time, switching the
active adapter per request. Serves /v1/completions (streamed) for the load generator.

    python -m loadtest.naive_server --base models/bench-base --adapters DIR [--port 8300]
"""

import argparse
import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteriaList, TextIteratorStreamer


class NaivePeft:
    """One PEFT model with every adapter loaded; generates for one request at a time, switching the adapter."""

    def __init__(self, base: Path, adapters: list[Path]):
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        self.model = PeftModel.from_pretrained(model, adapters[0], adapter_name=adapters[0].name)
        for path in adapters[1:]:
            self.model.load_adapter(path, adapter_name=path.name)
        self.lock = threading.Lock()  # one generation at a time: the model is shared and the adapter is switched

    def generate(self, name: str | None, prompt: str, max_tokens: int, streamer: TextIteratorStreamer,
                 gone: threading.Event) -> None:
        # A client that left stops its generation, so its queue does not run on into the next measurement.
        stop = StoppingCriteriaList([lambda *_args, **_kw: gone.is_set()])
        with self.lock, torch.no_grad():
            if gone.is_set():
                streamer.end()
                return
            ids = self.tokenizer(prompt, return_tensors="pt")
            kw = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, streamer=streamer,
                      stopping_criteria=stop)
            if name:
                self.model.set_adapter(name)
                self.model.generate(**ids, **kw)
            else:
                with self.model.disable_adapter():
                    self.model.generate(**ids, **kw)

    async def events(self, name: str | None, prompt: str, max_tokens: int) -> AsyncIterator[str]:
        """Server-sent events of one generation, run in a thread; leaving early stops it."""
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True)
        gone = threading.Event()
        threading.Thread(target=self.generate, args=(name, prompt, max_tokens, streamer, gone), daemon=True).start()
        created, loop = int(time.time()), asyncio.get_running_loop()
        try:
            while (text := await loop.run_in_executor(None, next, streamer, None)) is not None:
                chunk = {"object": "text_completion", "created": created, "model": name or "base",
                         "choices": [{"index": 0, "text": text, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = {"object": "text_completion", "choices": [], "usage": {"completion_tokens": max_tokens}}
            yield f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n"
        finally:
            gone.set()


def build(base: Path, adapters: list[Path]) -> FastAPI:
    peft = NaivePeft(base, adapters)
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await request.json()
        name = body.get("adapter")
        if name and name not in peft.model.peft_config:
            return JSONResponse({"error": {"message": f"no adapter {name}", "type": "invalid_request_error",
                                           "param": "adapter", "code": None}}, status_code=404)
        events = peft.events(name, body["prompt"], int(body.get("max_tokens") or 16))
        return StreamingResponse(events, media_type="text/event-stream")

    @app.get("/ready")
    async def ready() -> dict:
        return {"ready": True}

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--adapters", type=Path, required=True, help="directory of PEFT adapter directories")
    p.add_argument("--port", type=int, default=8300)
    args = p.parse_args()
    adapters = sorted(d for d in args.adapters.iterdir() if (d / "adapter_config.json").exists())
    uvicorn.run(build(args.base, adapters), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
