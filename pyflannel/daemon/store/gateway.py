"""One etcd member's grpc-gateway: the v3 API as JSON over HTTP, spoken with urllib3 alone (a full client library
would bring requests and its kin into pyflanneld's memory for a dozen POSTs).

The API's path is asked once per member (`GET /version`): /v3 from etcd 3.4 on, /v3beta on 3.3, /v3alpha before.
"""
from __future__ import annotations

import json
from typing import Iterator

import urllib3

from .base import answers

_NO_ANSWER = {408, 503, 504}  # the member is overloaded, has no leader, or timed out: another one may answer


class GatewayError(Exception):
    """etcd answered with an error; `text` is its reply."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


class Unreachable(GatewayError):
    """No answer from this member (refused, timed out, TLS refused, no leader): the next one may answer."""


class Gateway:
    def __init__(self, scheme: str, host: str, port: int, *, timeout: float, headers: dict, cafile=None,
                 certfile=None, keyfile=None):
        """`headers` is shared with the caller, who keeps its Authorization token in it."""
        self.base_url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"
        tls = dict(cert_reqs="CERT_REQUIRED", ca_certs=cafile, cert_file=certfile, key_file=keyfile) \
            if scheme == "https" else {}
        self.pool = urllib3.connection_from_url(self.base_url, timeout=timeout, retries=False, maxsize=4, **tls)
        self.timeout = timeout
        self.headers = headers
        self._api: str | None = None

    def post(self, path: str, body: dict) -> dict:
        """POST <api>/<path> with a JSON body: etcd's JSON reply."""
        reply = self._request("POST", self._api_path() + path, body)
        try:
            return json.loads(reply.data)
        except ValueError:
            raise GatewayError(f"not etcd's JSON: {reply.data[:200]!r}") from None

    def stream(self, path: str, body: dict, idle: float) -> Iterator[dict]:
        """POST now, then each JSON message of the streamed reply as it comes (closing the iterator ends the
        request). A read waits at most `idle` seconds (urllib3's ReadTimeoutError); any other break is an
        HTTPError, an OSError or a ValueError."""
        reply = self._request("POST", self._api_path() + path, body, stream=True,
                              timeout=urllib3.Timeout(connect=self.timeout, read=idle))
        return self._messages(reply)

    @staticmethod
    def _messages(reply) -> Iterator[dict]:
        try:
            pending = b""
            for chunk in reply.stream(None):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
        finally:
            reply.close()  # the connection too: a watch's stream may still be open, it must not serve another request
            reply.release_conn()

    def answers(self) -> bool:
        return answers(self.base_url, self.pool)

    def _api_path(self) -> str:
        if self._api is None:
            reply = self._request("GET", "/version")
            try:
                version = tuple(int(part) for part in json.loads(reply.data)["etcdserver"].split(".")[:2])
            except (ValueError, KeyError, TypeError, AttributeError):
                raise GatewayError(f"not etcd's /version: {reply.data[:200]!r}") from None
            self._api = "/v3/" if version >= (3, 4) else "/v3beta/" if version >= (3, 3) else "/v3alpha/"
        return self._api

    def _request(self, method: str, url: str, body: dict | None = None, stream: bool = False, timeout=None):
        headers = {"Content-Type": "application/json", **self.headers}
        try:
            reply = self.pool.urlopen(method, url, body=None if body is None else json.dumps(body), headers=headers,
                                      preload_content=not stream, timeout=timeout or self.timeout)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise Unreachable(str(e)) from None
        if reply.status != 200:
            text = reply.data.decode(errors="replace")
            reply.release_conn()
            raise (Unreachable if reply.status in _NO_ANSWER else GatewayError)(text or f"HTTP {reply.status}")
        return reply
