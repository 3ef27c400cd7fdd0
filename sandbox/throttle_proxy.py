"""A throttling HTTP proxy in front of the embedded AWS: SSM's shared Get* quota, made local.

SSM Parameter Store answers at most 40 Get* requests per second per account and region (the
default quota) and refuses the rest with `ThrottlingException`. moto has no quota, so fleet-scale
tests and bench/fleet.py put this proxy between the instances and the embedded AWS: a token
bucket (`rate` tokens per second, `burst` tokens deep, full at the start) lets a request through
to the upstream when a token is left and otherwise answers it itself with SSM's throttling error
(HTTP 400, JSON `__type: ThrottlingException`, as SSM does). A refused request takes no token.

It listens on 127.0.0.1 only, runs its asyncio loop in a thread of the process that owns it, and
counts what it forwarded and refused. Until `arm()` it forwards everything uncounted, so clients
can warm up (first-call set-up, connections) before a measured run starts.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.parse
from typing import Dict, Optional

THROTTLE_BODY = json.dumps({"__type": "ThrottlingException", "message": "Rate exceeded"}).encode()


class TokenBucket:
    """`rate` tokens per second up to `burst`; full at the start. Not thread-safe (one loop)."""

    def __init__(self, rate: float, burst: float, clock=time.monotonic):
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = burst
        self.stamp = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class ThrottleProxy:
    """`with ThrottleProxy(upstream_url, rate=40, burst=40) as proxy:` ... `proxy.url`."""

    def __init__(self, upstream: str, rate: float = 40.0, burst: Optional[float] = None):
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError(f"the upstream must be on loopback, got {upstream}")
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.rate = rate
        self.burst = rate if burst is None else burst  # one second of burst
        self.port = 0
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._server: Optional[asyncio.AbstractServer] = None
        self._thread: Optional[threading.Thread] = None
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._armed = False
        self._bucket = TokenBucket(rate, self.burst)
        self._counts: Dict[str, int] = {"forwarded": 0, "throttled": 0}
        self._error: Optional[BaseException] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- control (any thread)

    def arm(self) -> None:
        """Start throttling and counting from now, with a full bucket and zeroed counts."""
        with self._lock:
            self._bucket = TokenBucket(self.rate, self.burst)
            self._counts = {"forwarded": 0, "throttled": 0}
            self._armed = True

    def disarm(self) -> None:
        with self._lock:
            self._armed = False

    def counts(self) -> Dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def start(self, timeout: float = 10.0) -> ThrottleProxy:
        self._thread = threading.Thread(target=self._run, name="throttle-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"throttle proxy did not start: {self._error}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> ThrottleProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the loop (its own thread)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # this thread's: gather() at the end looks it up
        self._loop = loop
        try:
            # a fleet of instances connects at one moment: a deep accept backlog
            self._server = loop.run_until_complete(
                asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=4096)
            )
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            # end the open client connections' tasks before the loop closes under them
            self._server.close()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    def _admit(self) -> bool:
        with self._lock:
            if not self._armed:
                return True
            ok = self._bucket.take()
            self._counts["forwarded" if ok else "throttled"] += 1
            return ok

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: one request after another on this connection
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                body = await reader.readexactly(length) if length else b""
                if self._admit():
                    response, close = await self._forward(head, body)
                else:
                    response, close = self._throttled(), False
                writer.write(response)
                await writer.drain()
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    @staticmethod
    def _throttled() -> bytes:
        return (
            b"HTTP/1.1 400 Bad Request\r\n"
            b"Content-Type: application/x-amz-json-1.1\r\n"
            b"x-amzn-RequestId: 00000000-0000-0000-0000-000000000000\r\n"
            b"Content-Length: " + str(len(THROTTLE_BODY)).encode() + b"\r\n\r\n" + THROTTLE_BODY
        )

    async def _forward(self, head: bytes, body: bytes) -> tuple:
        """The upstream's whole response to one request (a fresh connection, closed after), and
        whether the client's connection must close too (the upstream said so)."""
        lines = [
            line
            for line in head.rstrip(b"\r\n").split(b"\r\n")
            if not line.lower().startswith(b"connection:")
        ]
        request = b"\r\n".join(lines) + b"\r\nConnection: close\r\n\r\n" + body
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        try:
            up_writer.write(request)
            await up_writer.drain()
            resp_head = await up_reader.readuntil(b"\r\n\r\n")
            length = None
            for line in resp_head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if length is None:
                resp_body = await up_reader.read()  # until the upstream closes
                # without a length the client can only find the end by the close
                return resp_head + resp_body, True
            resp_body = await up_reader.readexactly(length)
        finally:
            up_writer.close()
        # the client keeps its connection: drop the upstream's "Connection: close"
        kept = [
            line
            for line in resp_head.rstrip(b"\r\n").split(b"\r\n")
            if not line.lower().startswith(b"connection:")
        ]
        return b"\r\n".join(kept) + b"\r\n\r\n" + resp_body, False
