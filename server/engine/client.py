"""The one owner of traffic to a vLLM engine: completions, the adapters it holds and their unloading, health probes
and metrics, and the one translation of engine failures into the gateway's errors."""

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from server.core.errors import MAX_MESSAGE_CHARS, APIError
from server.core.protocol import non_finite_field

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


def refusal(status: int, content: bytes, adapter: str | None = None) -> APIError:
    """An engine's refusal of a request, in OpenAI's error shape (vLLM's own has an integer code)."""
    message, param = engine_message(status, content)
    if status in (401, 403):  # the engine refused the gateway, not the caller: a misconfiguration
        log.error("engine refused the gateway's key (%s): set the same LORAPLEX_ENGINE_API_KEY on both", message)
        return APIError(502, "the engine refused the gateway's credential", type="server_error",
                        code="engine_auth_failed")
    if status >= 500:
        return APIError(502, f"engine failed: {message}", type="server_error", code="engine_error")
    if adapter is not None and status in (400, 404) and (f"`{adapter}`" in message or f"'{adapter}'" in message):
        return _adapter_refusal(status, adapter, message)
    return APIError(status, message, param=param, code="engine_rejected")


def _adapter_refusal(status: int, adapter: str, message: str) -> APIError:
    """The engine could not resolve or load the version the gateway named. Its message may name the registry's
    paths, so only the log gets it."""
    log.warning("engine could not serve adapter %s: %s", adapter, message)
    if status == 404:  # deleted since this gateway last read the registry
        return APIError(404, f"adapter {adapter!r} not found", param="adapter", code="adapter_not_found")
    if "is invalid" in message:  # the engine's resolver checked the files: the version itself cannot be loaded
        return APIError(400, f"adapter {adapter} is invalid: the engine could not load its weights", param="adapter",
                        code="adapter_load_failed")
    return APIError(400, f"loading adapter {adapter} failed: the engine refused it", param="adapter",
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
    _response: aiohttp.ClientResponse

    def chunks(self) -> AsyncIterator[bytes]:
        return self._response.content.iter_any()

    async def read(self, limit: int) -> bytes:
        parts, size = [], 0
        async for chunk in self._response.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            parts.append(chunk)
        return b"".join(parts)

    async def close(self) -> None:
        # A body read to the end returns its connection to the pool; one cut short closes it, and vLLM aborts.
        self._response.release()


# A refused connection is aiohttp's ClientConnectorError; no connection in time, ConnectionTimeoutError.
_NO_CONNECTION = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


class EngineClient:
    """Talks to one vLLM OpenAI server over the gateway's shared aiohttp session.

    aiohttp directly, not httpx over it: httpx's request building, cookies and send machinery were a fifth of the
    gateway's CPU per non-streamed request."""

    def __init__(self, url: str, session: aiohttp.ClientSession, request_timeout: float = 600.0,
                 api_key: str | None = None):
        self.url = url.rstrip("/")
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=request_timeout)
        self.auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def send(self, path: str, payload: dict, request_id: str, context: dict[str, str] | None = None
                   ) -> EngineAnswer:
        """Posts a request under the caller's request id (vLLM's X-Request-Id, which names its request and its answer's
        id) and trace `context` headers; the answer's body streams. Unreachable when the request could not reach it."""
        try:
            data = json.dumps(payload, allow_nan=False).encode()
        except ValueError:  # NaN and infinities are not JSON
            field = non_finite_field(payload) or "body"
            raise APIError(400, f"{field}: must be a finite number (NaN and Infinity are not JSON)", param=field,
                           code="invalid_value") from None
        try:
            response = await self.session.post(f"{self.url}{path}", data=data, timeout=self.timeout,
                                               headers={"content-type": "application/json",
                                                        "x-request-id": request_id, **self.auth, **(context or {})})
        except _NO_CONNECTION as e:
            raise Unreachable(type(e).__name__) from None
        except (aiohttp.ClientError, TimeoutError) as e:
            # A pooled connection the engine had closed (it died or restarted): the request was never written.
            if isinstance(e.__cause__, aiohttp.ClientConnectionResetError):
                raise Unreachable("the engine closed the connection before the request was sent") from None
            raise APIError(503, f"engine unavailable: {type(e).__name__}", type="server_error",
                           code="engine_unavailable") from None
        return EngineAnswer(response.status, response.headers.get("content-type", "application/json"),
                            response.content_length, response)

    async def healthy(self) -> bool | None:
        """Whether /health says 200; None when it did not answer in time, as a saturated engine may not.

        A connection that cannot be made is down at once (a saturated engine still accepts connections); any other
        failure, a malformed answer included, is a failed probe."""
        try:
            async with self.session.get(f"{self.url}/health", timeout=aiohttp.ClientTimeout(total=2.0)) as r:
                return r.status == 200
        except _NO_CONNECTION:
            return False
        except TimeoutError:
            return None
        except Exception:
            log.warning("health probe of %s failed", self.url, exc_info=True)
            return False

    async def metrics(self) -> tuple[int, bytes]:
        """The engine's own Prometheus text and status."""
        try:
            async with self.session.get(f"{self.url}/metrics", timeout=aiohttp.ClientTimeout(total=10),
                                        headers=self.auth) as r:
                return r.status, await r.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise APIError(503, f"engine unavailable: {type(e).__name__}", type="server_error",
                           code="engine_unavailable") from None

    async def adapters(self) -> set[str] | None:
        """The adapter versions the engine holds (its /v1/models less the base model); None if it did not say."""
        try:
            async with self.session.get(f"{self.url}/v1/models", timeout=aiohttp.ClientTimeout(total=2.0),
                                        headers=self.auth) as r:
                cards = (await r.json())["data"] if r.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError):
            return None
        return None if cards is None else {c["id"] for c in cards if c.get("parent")}

    async def call(self, path: str, body: dict, adapter: str | None = None) -> dict:
        """Posts `body` and returns the engine's JSON answer; a refusal raises the APIError a caller would get."""
        status, content = await self._post(path, body)
        if status != 200:
            raise refusal(status, content, adapter)
        return json.loads(content)

    async def unload_lora(self, name: str) -> None:
        status, content = await self._post("/v1/unload_lora_adapter", {"lora_name": name})
        if status not in (200, 404):
            raise EngineError(status, engine_message(status, content)[0])

    async def _post(self, path: str, body: dict) -> tuple[int, bytes]:
        try:
            async with self.session.post(f"{self.url}{path}", json=body, timeout=self.timeout,
                                         headers=self.auth) as r:
                return r.status, await r.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise Unreachable(type(e).__name__) from None
