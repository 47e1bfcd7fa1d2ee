"""Engines found by DNS: one name (a Kubernetes headless Service) that resolves to every engine, resolved again
every few seconds, so engines that join or leave are routed to or passed over without a restart."""

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from server.engine.routing import Backend, Router

log = logging.getLogger("loraplex.discovery")


async def resolve(host: str, port: int) -> list[str]:
    """Every address the name has now, in a stable order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


class Discovery:
    """Keeps `router.backends` equal to the engines behind `url`'s host name; `make` builds a Backend for a URL."""

    def __init__(self, url: str, router: Router, make: Callable[[str], Backend], interval: float = 5.0,
                 lookup: Callable[[str, int], Awaitable[list[str]]] = resolve):
        parts = urlsplit(url)
        if not parts.hostname or not parts.port:
            raise ValueError(f"engine_dns: {url!r} needs a host name and a port, as in http://loraplex-engine:8100")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.router, self.make, self.interval, self.lookup = router, make, interval, lookup

    def url(self, address: str) -> str:
        host = f"[{address}]" if ":" in address else address
        return f"{self.scheme}://{host}:{self.port}"

    async def update(self) -> None:
        """One resolution: engines new to the name are added (down until their first good probe), gone ones removed
        from the choice (requests already on them finish)."""
        wanted = [self.url(a) for a in await self.lookup(self.host, self.port)]
        current = {b.engine.url: b for b in self.router.backends}
        for url in wanted:
            if url not in current:
                log.info("engine %s joined %s", url, self.host)
                self.router.backends.append(self.make(url))
        for url, backend in current.items():
            if url not in wanted:
                log.warning("engine %s left %s", url, self.host)
                self.router.backends.remove(backend)

    async def run(self) -> None:
        """Resolves the name every `interval` seconds until cancelled; a failed resolution keeps the last answer."""
        while True:
            try:
                await self.update()
            except OSError as e:
                log.warning("resolving %s failed (%s); keeping the %d engines known", self.host, e,
                            len(self.router.backends))
            await asyncio.sleep(self.interval)
