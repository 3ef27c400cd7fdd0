"""IMDSv2 client: every fact about this instance comes through here.

Token flow: `PUT /latest/api/token` with a TTL; the token is reused until shortly before it
expires and refreshed once when a GET answers 401 (IMDS restarted, clock skew). Each request
has a short timeout and a bounded number of attempts, so an instance without IMDS fails fast
with `ImdsUnavailable` instead of hanging.

Every failure is an `ImdsError`, never a transport's own exception: `ImdsUnavailable` when no
answer came (refused, reset, timed out, a bad status line, a body shorter than its
Content-Length, HTTP 5xx: `http.client`'s errors included), `ImdsMalformed` when an answer came
but does not mean anything (a Spot notice that is not a JSON object with an `action`, a body
that is not UTF-8). Both name the path and what was wrong, so a daemon can log each distinct
failure once and carry on with the facts that did read.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.request
from typing import Callable, Dict, Optional

from agent.errors import AgentError

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "http://169.254.169.254/"
ENDPOINT_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
# refresh this long before the TTL ends, so a token never expires between check and use
_TOKEN_MARGIN = 60.0


class ImdsError(AgentError):
    """A fact could not be read from IMDS (the message names the path)."""


class ImdsUnavailable(ImdsError):
    """IMDS could not be reached, or gave no usable HTTP answer, on every attempt."""


class ImdsNoToken(ImdsUnavailable):
    """No session token: every read fails the same way until IMDS answers again."""


class ImdsMalformed(ImdsError):
    """IMDS answered, but the answer is not what the path documents."""


# what one HTTP exchange can raise besides an answer: socket errors (OSError: refused, reset,
# timeout), http.client's protocol errors (BadStatusLine, IncompleteRead, RemoteDisconnected,
# LineTooLong; HTTPException), and ValueError from a response too broken to parse
_TRANSPORT_ERRORS = (OSError, http.client.HTTPException, ValueError)
_EXCERPT = 60  # characters of a malformed answer quoted in its error


def _excerpt(text: str) -> str:
    return repr(text if len(text) <= _EXCERPT else text[:_EXCERPT] + "...")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ImdsClient:
    def __init__(
        self,
        endpoint: Optional[str] = None,
        timeout: float = 1.0,
        attempts: int = 3,
        token_ttl: int = 21600,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        base = endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT
        if not base.startswith(("http://", "https://")):
            raise ImdsUnavailable(f"IMDS endpoint {base!r} is not an http(s) URL")
        self.endpoint = base.rstrip("/") + "/"
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.token_ttl = token_ttl
        self._clock = clock
        self._sleep = sleep
        self._token: Optional[str] = None
        self._token_expires = 0.0
        self.token_fetches = 0

    @classmethod
    def from_config(cls, cfg) -> ImdsClient:
        return cls(
            endpoint=cfg.imds.endpoint,
            timeout=cfg.imds.timeout,
            attempts=cfg.imds.attempts,
            token_ttl=cfg.imds.token_ttl,
        )

    # -- transport -------------------------------------------------------------------------

    def _open(self, req: urllib.request.Request) -> tuple[int, bytes]:
        """One HTTP exchange; returns (status, body). Failures raise one of _TRANSPORT_ERRORS."""
        # IMDS is link-local; a proxy from the environment must never see these requests
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            # the scheme is checked in __init__: only http(s) endpoints get here
            with opener.open(req, timeout=self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            try:
                return err.code, err.read() or b""
            finally:
                err.close()

    def _with_retries(self, what: str, req_factory: Callable[[], urllib.request.Request]):
        last: Optional[BaseException] = None
        for attempt in range(self.attempts):
            try:
                status, body = self._open(req_factory())
            except _TRANSPORT_ERRORS as exc:
                last = exc
            else:
                if status < 500:
                    return status, body
                last = AgentError(f"HTTP {status}")
            if attempt + 1 < self.attempts:
                self._sleep(min(0.2 * 2**attempt, 1.0))
        raise ImdsUnavailable(
            f"IMDS at {self.endpoint} unreachable for {what} after {self.attempts} attempts: "
            f"{_describe(last) if last is not None else '-'}"
        )

    def _fetch_token(self) -> str:
        def req() -> urllib.request.Request:
            return urllib.request.Request(
                self.endpoint + "latest/api/token",
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(self.token_ttl)},
            )

        try:
            status, body = self._with_retries("a session token", req)
        except ImdsUnavailable as exc:
            raise ImdsNoToken(str(exc)) from None
        if status != 200 or not body:
            raise ImdsNoToken(f"IMDS at {self.endpoint} refused a session token (HTTP {status})")
        try:
            token = body.decode("ascii").strip()
        except UnicodeDecodeError:
            raise ImdsMalformed(f"IMDS at {self.endpoint} answered a non-ASCII token") from None
        self.token_fetches += 1
        self._token = token
        self._token_expires = (
            self._clock() + self.token_ttl - min(_TOKEN_MARGIN, self.token_ttl / 2)
        )
        return self._token

    def token(self) -> str:
        if self._token is None or self._clock() >= self._token_expires:
            return self._fetch_token()
        return self._token

    def get(self, path: str) -> Optional[str]:
        """GET latest/<path>; None on 404 (the fact does not exist), text otherwise."""
        url = self.endpoint + "latest/" + path.lstrip("/")
        for refreshed in (False, True):
            token = self.token()

            def req(token: str = token) -> urllib.request.Request:
                return urllib.request.Request(url, headers={"X-aws-ec2-metadata-token": token})

            status, body = self._with_retries(path, req)
            if status == 401 and not refreshed:
                log.info("IMDS token rejected (401); fetching a new one")
                self._token = None
                continue
            if status == 404:
                return None
            if status != 200:
                raise ImdsUnavailable(f"IMDS GET {path} answered HTTP {status}")
            try:
                return body.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ImdsMalformed(f"IMDS {path} is not UTF-8 text ({exc.reason})") from None
        raise ImdsUnavailable(f"IMDS GET {path} rejected a fresh token (HTTP 401)")

    def require(self, path: str) -> str:
        value = self.get(path)
        if value is None:
            raise ImdsUnavailable(f"IMDS has no {path}")
        return value

    # -- facts -----------------------------------------------------------------------------

    def instance_id(self) -> str:
        return self.require("meta-data/instance-id").strip()

    def region(self) -> str:
        return self.require("meta-data/placement/region").strip()

    def availability_zone(self) -> str:
        return self.require("meta-data/placement/availability-zone").strip()

    def tags_enabled(self) -> bool:
        return self.get("meta-data/tags/instance") is not None

    def tag(self, key: str) -> Optional[str]:
        """An instance tag through IMDS; None when absent or when tags in metadata are off."""
        value = self.get("meta-data/tags/instance/" + key)
        return value if value is None else value.strip()

    def tags(self) -> Dict[str, str]:
        listing = self.get("meta-data/tags/instance")
        if listing is None:
            return {}
        out = {}
        for key in filter(None, (k.strip() for k in listing.splitlines())):
            value = self.tag(key)
            if value is not None:
                out[key] = value
        return out

    def target_lifecycle_state(self) -> Optional[str]:
        value = self.get("meta-data/autoscaling/target-lifecycle-state")
        return value.strip() if value else None

    def spot_instance_action(self) -> Optional[dict]:
        """{"action": "terminate", "time": "..."} when a Spot interruption is scheduled."""
        path = "meta-data/spot/instance-action"
        value = self._json(path)
        if value is not None and not (isinstance(value.get("action"), str) and value["action"]):
            raise ImdsMalformed(f'IMDS {path} has no "action": {_excerpt(json.dumps(value))}')
        return value

    def rebalance_recommendation(self) -> Optional[dict]:
        return self._json("meta-data/events/recommendations/rebalance")

    def _json(self, path: str) -> Optional[dict]:
        """The JSON object at `path`; None on 404; ImdsMalformed for anything but an object."""
        text = self.get(path)
        if text is None:
            return None
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ImdsMalformed(
                f"IMDS {path} is not JSON ({exc.__class__.__name__} at char "
                f"{getattr(exc, 'pos', '?')}): {_excerpt(text)}"
            ) from None
        if not isinstance(value, dict):
            raise ImdsMalformed(f"IMDS {path} is not a JSON object: {_excerpt(text)}")
        return value
