"""The image repository from HTTP(S) mirrors: a python-tuf fetcher over plain HTTP, and the ordered list of sources.

Why mirrors are safe to take from anyone who may name them (the agent's settings, the director's signed metadata):
a mirror URL only says where to look. Every metadata file fetched from a mirror is verified by ``tuf.ngclient``
against the image repository's root, and every artifact chunk against the signed chunk list before it is written
(``agent.update.fetch.download``); what a hostile or broken mirror can do is waste a timeout. Only ``http`` and
``https`` URLs are accepted (``file:`` or ``ftp:`` would make a device read what no fleet operator meant it to), and
redirects may not leave them either.

``HttpFetcher`` maps the agent's repository URLs (``repo://image/metadata/…``) onto one mirror
(``https://cdn.example/edgefleet/metadata/…``) with the stdlib's urllib: no HTTP dependency for a small device.
``read_range`` resumes with ``Range: bytes=N-``; a server without Range support (``python -m http.server``)
answers 200 and the first N bytes are skipped. ``Sources`` puts the mirrors before the MQTT repository: a
metadata file comes from the first mirror that has it (buffered whole, so a mirror failing halfway leaves nothing
for the Updater to read), else from MQTT. A mirror that times out, drops the connection, or serves bytes that fail a
check is *refused*: logged, counted, and not asked again for the rest of the update round.
"""

from __future__ import annotations

import http.client
import logging
import re
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from tuf.api import exceptions as tuf_errors
from tuf.ngclient.fetcher import FetcherInterface

from agent import logs
from agent.chunks import Chunk

__all__ = ["MAX_MIRRORS", "HttpFetcher", "Sources", "valid_mirrors"]

log = logging.getLogger("edgefleet.mirrors")

MAX_MIRRORS = 8  # more is a configuration mistake; each refused one costs at most a timeout per round
MAX_URL = 2048
MAX_BUFFERED = 32 * 1024 * 1024  # a metadata file (or chunk list) from a mirror is held whole; ngclient's own caps are far lower
BLOCK = 256 * 1024
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


def valid_mirrors(urls: Iterable[Any]) -> list[str]:
    """The usable mirror base URLs of ``urls`` (http or https, with a host), each ending in ``/``, in order, without
    repeats; anything else is dropped (a signed list in a shape we do not publish must not stop an update)."""
    out: list[str] = []
    for url in urls:
        if not isinstance(url, str) or len(url) > MAX_URL:
            continue
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            continue
        base = url if url.endswith("/") else url + "/"
        if base not in out:
            out.append(base)
    return out[:MAX_MIRRORS]


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a CDN's redirects, but never off http(s) (urllib would follow one to ftp:)."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> urllib.request.Request | None:
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, f"redirect to {newurl} refused", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class HttpFetcher(FetcherInterface):
    """One mirror: ``base_url + path`` is fetched from ``mirror + path``. ``timeout`` bounds the connection and each
    read, so a mirror that stalls mid-file fails within it."""

    def __init__(self, mirror: str, base_url: str, timeout: float = 10.0) -> None:
        self.mirror = mirror if mirror.endswith("/") else mirror + "/"
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.timeout = timeout
        self._opener = urllib.request.build_opener(_HttpOnlyRedirects())

    def _url(self, url: str) -> str:
        if not url.startswith(self.base_url):
            raise tuf_errors.DownloadHTTPError(f"{url} is outside {self.base_url}", 404)
        return self.mirror + urllib.parse.quote(url[len(self.base_url) :])

    def _open(self, url: str, offset: int) -> http.client.HTTPResponse:
        target = self._url(url)
        headers = {"User-Agent": "edgefleet-agent", "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            response: http.client.HTTPResponse = self._opener.open(urllib.request.Request(target, headers=headers), timeout=self.timeout)
            return response
        except urllib.error.HTTPError as exc:
            exc.close()
            raise tuf_errors.DownloadHTTPError(f"{target}: HTTP {exc.code}", exc.code) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
            raise tuf_errors.DownloadError(f"{target}: {exc}") from exc

    def _fetch(self, url: str) -> Iterator[bytes]:
        response = self._open(url, 0)
        return _read(response, url, None)

    def read_range(self, url: str, offset: int, size: int) -> Iterator[bytes]:
        """Bytes ``offset..size`` of a file whose signed length is ``size``; another size on the mirror is an error."""
        response = self._open(url, offset)
        try:
            skip = _check_range(response, url, offset, size)
        except tuf_errors.DownloadError:
            response.close()
            raise
        return _read(response, url, size - offset, skip)


def _check_range(response: http.client.HTTPResponse, url: str, offset: int, size: int) -> int:
    """How many bytes to skip at the start of ``response`` so it begins at ``offset`` (0 for a 206)."""
    if response.status == 206:
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if match is None or int(match.group(1)) != offset:
            raise tuf_errors.DownloadError(f"{url}: Content-Range {response.headers.get('Content-Range')!r}, asked for {offset}-")
        total = int(match.group(3))
    elif response.status == 200:
        length = response.headers.get("Content-Length")
        total = int(length) if length is not None and length.isdigit() else size
    else:
        raise tuf_errors.DownloadError(f"{url}: HTTP {response.status}")
    if total != size:
        raise tuf_errors.DownloadLengthMismatchError(f"{url}: {total} bytes on the mirror, the signed length is {size}")
    return offset if response.status == 200 else 0


def _read(response: http.client.HTTPResponse, url: str, length: int | None, skip: int = 0) -> Iterator[bytes]:
    """The body in blocks as they arrive (after skipping ``skip`` bytes), at most ``length`` of them. A body that ends
    before its Content-Length (the mirror died mid-file) and every transport error is a DownloadError."""
    with response:
        try:
            while skip:
                block = response.read1(min(BLOCK, skip))
                if not block:
                    raise tuf_errors.DownloadError(f"{url}: the mirror closed before the resume offset")
                skip -= len(block)
            while length is None or length > 0:
                # read1: what has arrived, so the bytes before a stall are verified and kept, not lost with the timeout
                block = response.read1(BLOCK if length is None else min(BLOCK, length))
                if not block:
                    break
                if length is not None:
                    length -= len(block)
                yield block
        except (OSError, http.client.HTTPException, ValueError) as exc:  # a read timeout is an OSError
            raise tuf_errors.DownloadError(f"{url}: {type(exc).__name__}: {exc}") from exc
        if response.length:  # http.client counts down the Content-Length: bytes promised and never sent
            raise tuf_errors.DownloadError(f"{url}: the mirror closed the connection {response.length} bytes short")


class Sources(FetcherInterface):
    """The image repository's sources in order: the mirrors, then ``last`` (the MQTT repository), which is never
    refused and keeps its own error semantics. One instance lives for one update round."""

    def __init__(self, last: FetcherInterface, base_url: str, mirrors: Iterable[str] = (), timeout: float = 10.0) -> None:
        self.last, self.base_url, self.timeout = last, base_url, timeout
        self.mirrors: list[HttpFetcher] = []
        self.refused: Counter[str] = Counter()  # mirror -> refusals in this round
        self._last: tuple[HttpFetcher, str] | None = None  # the mirror that served the latest fetch, and the URL
        self.add(mirrors)

    def add(self, urls: Iterable[str]) -> None:
        """More mirrors (the director's, once its metadata is verified), after the ones already listed."""
        known = {m.mirror for m in self.mirrors}
        for url in valid_mirrors(urls):
            if url not in known and len(self.mirrors) < MAX_MIRRORS:
                self.mirrors.append(HttpFetcher(url, self.base_url, self.timeout))

    def usable(self) -> list[HttpFetcher]:
        """The mirrors not refused in this round, in order."""
        return [m for m in self.mirrors if not self.refused[m.mirror]]

    def refuse(self, mirror: HttpFetcher, url: str, reason: str) -> None:
        self.refused[mirror.mirror] += 1
        if self._last is not None and self._last[0] is mirror:
            self._last = None
        logs.event(log, "mirror.refused", logging.WARNING, mirror=mirror.mirror, url=url, reason=reason)

    def _fetch(self, url: str) -> Iterator[bytes]:
        for mirror in self.usable():
            try:
                data = _buffered(mirror.fetch(url), url)
                self._last = (mirror, url)
                return iter([data])
            except tuf_errors.DownloadHTTPError as exc:
                if exc.status_code != 404:
                    self.refuse(mirror, url, str(exc))
                # a 404 is not a fault: ngclient probes for the next root, and a mirror may lag behind
            except tuf_errors.DownloadError as exc:
                self.refuse(mirror, url, str(exc))
        self._last = None
        return self.last.fetch(url)

    def blame(self, reason: str) -> bool:
        """Refuse the mirror that served the latest fetch (its bytes failed a check): True when a mirror did, so
        fetching that file again tries the next source."""
        last, self._last = self._last, None
        if last is not None:
            self.refuse(last[0], last[1], reason)
        return last is not None

    def read_range(self, url: str, offset: int, size: int) -> Iterator[Chunk]:
        """The last source's bytes (``download`` asks the mirrors itself, one at a time, to refuse them singly); from
        the MQTT repository, memoryviews into the replies, each with the sha256 computed on arrival."""
        read: Iterator[Chunk] = self.last.read_range(url, offset, size)  # type: ignore[attr-defined]
        return read


def _buffered(stream: Iterator[bytes], url: str) -> bytes:
    data = bytearray()
    for block in stream:
        data += block
        if len(data) > MAX_BUFFERED:
            raise tuf_errors.DownloadError(f"{url}: more than {MAX_BUFFERED} bytes")
    return bytes(data)
