"""The one owner of traffic to a vLLM engine: completions, adapter loads, health probes and metrics, and the one
translation of engine failures into the gateway's errors."""

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from .protocol import MAX_MESSAGE_CHARS, APIError, non_finite_field

log = logging.getLogger("loraplex.engine")


class EngineError(Exception):
    """The engine refused an operation; carries its status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Unreachable(Exception):
    """A request never reached the engine, so another engine may take it."""


def engine_message(status: int, content: bytes) -> tuple[str, str | None]:
    """The message and param of an engine's error body (vLLM's shape or OpenAI's), or its text."""
    try:
        error = json.loads(content)["error"]
        message, param = str(error["message"]), error.get("param")
    except (ValueError, KeyError, TypeError):
        message, param = content.decode(errors="replace") or f"engine answered {status}", None
    return message[:MAX_MESSAGE_CHARS], param if isinstance(param, str) else None


def refusal(status: int, content: bytes) -> APIError:
    """An engine's refusal of a request, in OpenAI's error shape (vLLM's own has an integer code)."""
    message, param = engine_message(status, content)
    if status >= 500:
        return APIError(502, f"engine failed: {message}", type="server_error", code="engine_error")
    return APIError(status, message, param=param, code="engine_rejected")


def load_refusal(key: str, e: EngineError) -> APIError:
    """An engine's refusal to load an adapter; its message names the registry's path, so only the log gets it."""
    log.warning("engine refused to load %s: %s", key, e.message)
    client_side = e.status < 500
    return APIError(400 if client_side else 502, f"loading adapter {key} failed: the engine refused it "
                    f"(status {e.status})", type="invalid_request_error" if client_side else "server_error",
                    code="adapter_load_failed")


def too_large(limit: int) -> APIError:
    return APIError(502, f"the engine's answer is larger than {limit} bytes (LORAPLEX_MAX_RESPONSE_BYTES)",
                    type="server_error", code="response_too_large")


@dataclass
class EngineAnswer:
    """An engine's answer whose body has not been read yet; `close()` before the end makes vLLM abort."""

    status: int
    content_type: str
    length: int | None
    _response: httpx.Response

    def chunks(self) -> AsyncIterator[bytes]:
        return self._response.aiter_raw()

    async def read(self, limit: int) -> bytes:
        parts, size = [], 0
        async for chunk in self._response.aiter_raw():
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            parts.append(chunk)
        return b"".join(parts)

    async def close(self) -> None:
        await self._response.aclose()


class EngineClient:
    """Talks to one vLLM OpenAI server over the gateway's shared HTTP client."""

    def __init__(self, url: str, client: httpx.AsyncClient):
        self.url = url.rstrip("/")
        self.client = client

    async def send(self, path: str, payload: dict) -> EngineAnswer:
        """Posts a request; the answer's body streams. Unreachable when no connection could be made."""
        try:
            request = self.client.build_request("POST", f"{self.url}{path}", json=payload)
        except ValueError:  # httpx refuses NaN and infinities when it encodes the body
            field = non_finite_field(payload) or "body"
            raise APIError(400, f"{field}: must be a finite number (NaN and Infinity are not JSON)", param=field,
                           code="invalid_value") from None
        try:
            response = await self.client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise Unreachable(type(e).__name__) from None
        except httpx.TransportError as e:
            raise APIError(503, f"engine unavailable: {type(e).__name__}", type="server_error",
                           code="engine_unavailable") from None
        length = response.headers.get("content-length", "")
        return EngineAnswer(response.status_code, response.headers.get("content-type", "application/json"),
                            int(length) if length.isascii() and length.isdigit() else None, response)

    async def healthy(self) -> bool | None:
        """Whether /health says 200; None when it did not answer in time, as a saturated engine may not.

        A connection that cannot be made is down at once: aiohttp's transport reports a refused connection as
        ConnectTimeout, and a saturated engine still accepts connections. Any other failure is a failed probe."""
        try:
            return (await self.client.get(f"{self.url}/health", timeout=2.0)).status_code == 200
        except (httpx.ConnectError, httpx.ConnectTimeout):
            return False
        except httpx.TimeoutException:
            return None
        except Exception:
            log.warning("health probe of %s failed", self.url, exc_info=True)
            return False

    async def metrics(self) -> tuple[int, bytes]:
        """The engine's own Prometheus text and status."""
        try:
            r = await self.client.get(f"{self.url}/metrics", timeout=10)
        except httpx.TransportError as e:
            raise APIError(503, f"engine unavailable: {type(e).__name__}", type="server_error",
                           code="engine_unavailable") from None
        return r.status_code, r.content

    async def load_lora(self, name: str, path: str) -> None:
        """Loads an adapter; Unreachable when the engine cannot be reached, EngineError when it refuses."""
        r = await self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        # The engine can already hold it when the gateway restarted; version directories never change.
        if r.status_code == 400 and "already been loaded" in r.text:
            return
        if r.status_code != 200:
            raise EngineError(r.status_code, engine_message(r.status_code, r.content)[0])

    async def unload_lora(self, name: str) -> None:
        r = await self._post("/v1/unload_lora_adapter", {"lora_name": name})
        if r.status_code not in (200, 404):
            raise EngineError(r.status_code, engine_message(r.status_code, r.content)[0])

    async def _post(self, path: str, body: dict) -> httpx.Response:
        try:
            return await self.client.post(f"{self.url}{path}", json=body)
        except httpx.TransportError as e:
            raise Unreachable(type(e).__name__) from None
