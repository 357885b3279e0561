"""Reading an image's bytes from wherever a source points: local or fsspec paths (s3://...),
http(s) URLs, or a byte range of a tar file.

A manifest is untrusted input, so every locator is bounded: in bytes (`data.max_image_bytes`),
in time (`data.fetch_timeout_s` for the whole download, `data.http_timeout_s` for each read) and,
for URLs, in where it may lead. HTTP redirects are followed here, not by a library, so that every
hop's address is checked after DNS resolution, and the connection goes to the address checked:
loopback, private, link-local (cloud metadata lives at 169.254.169.254) and multicast addresses
are refused unless `data.allow_private_urls` is set. Every failure is a `FetchError` with a report
reason, whatever the input looks like.

HTTP goes through urllib3 connection pools, one per (scheme, host, port), kept for the life of
the worker process: connections are reused (keep-alive), and DNS answers are cached for
DNS_TTL_S. A reused connection was checked when it was opened; a new one connects to addresses
checked just before. `Retry-After` on 429 and 503 is honoured, up to MAX_RETRY_AFTER_S and
within the fetch's deadline.
"""

from __future__ import annotations

import email.utils
import http.client
import ipaddress
import os
import socket
import stat
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import urllib3
from urllib3 import exceptions as u3
from urllib3.connection import HTTPConnection as _U3Connection
from urllib3.connection import HTTPSConnection as _U3SConnection

from pipelines.config import DataConfig
from pipelines.core.storage import get_fs

_OK_TYPES = ("image/", "application/octet-stream", "binary/octet-stream")
_REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
MAX_RETRY_AFTER_S = 30.0  # a longer Retry-After is cut to this (and always to the deadline)
DNS_TTL_S = 60.0
POOL_SIZE = 64  # idle keep-alive connections kept per (scheme, host, port)
_READ = 64 * 1024
_DRAIN = 64 * 1024  # an error response's body up to this is read, so that its connection is reused
_HEADERS = {"User-Agent": "mmfusion-ingest/0.1", "Accept": "image/*"}
# fsspec protocols an untrusted manifest may name: object stores, whose endpoints the operator
# configures. Others (ftp, webhdfs, `simplecache::http://...` chains) could reach any host, so
# they need `data.allow_private_urls`.
SAFE_PROTOCOLS = frozenset({"file", "local", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})


class FetchError(IOError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class FetchLimits:
    """How long, how much and from where one image may be read."""

    timeout_s: float = 10.0  # connecting, and each read
    retries: int = 2  # further tries after a timeout, a connection error, 429 or 5xx
    total_s: float = 60.0  # the whole fetch: all tries, redirects and reads
    max_bytes: int = 64 * 1024 * 1024
    allow_private: bool = False

    @classmethod
    def of(cls, cfg: DataConfig) -> FetchLimits:
        return cls(cfg.http_timeout_s, cfg.http_retries, cfg.fetch_timeout_s, cfg.max_image_bytes,
                   cfg.allow_private_urls)


def scheme_of(uri: str) -> str:
    """The URI's scheme in lower case (`HTTP://` is `http`); "" for a plain path."""
    head, sep, _ = uri.partition("://")
    return head.lower() if sep and "/" not in head else ""


def _blocked(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """What kind of non-public address `ip` is ("" for a public one)."""
    ip = getattr(ip, "ipv4_mapped", None) or ip
    for kind in ("loopback", "link_local", "multicast", "private", "unspecified", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return "" if ip.is_global else "non-global"


_dns: dict[tuple[str, int], tuple[float, list]] = {}
_dns_lock = threading.Lock()


def _lookup(host: str, port: int) -> list[tuple]:
    """getaddrinfo, cached for DNS_TTL_S (failures are not cached)."""
    now = time.monotonic()
    with _dns_lock:
        hit = _dns.get((host, port))
    if hit and now - hit[0] < DNS_TTL_S:
        return hit[1]
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    with _dns_lock:
        if len(_dns) > 100_000:  # a list of mostly distinct hosts: start again rather than grow
            _dns.clear()
        _dns[(host, port)] = (now, infos)
    return infos


def _resolve(host: str, port: int, allow_private: bool) -> list[tuple]:
    """The addresses of `host` (cached DNS); a FetchError when any of them is not public. The
    check runs on every call, cached answer or not."""
    try:
        infos = _lookup(host, port)
    except (OSError, UnicodeError, ValueError) as e:
        raise FetchError("http_error", f"cannot resolve host {host!r}: {e}") from e
    if not allow_private:
        for info in infos:
            ip = ipaddress.ip_address(info[4][0].split("%")[0])
            if kind := _blocked(ip):
                raise FetchError("blocked_address", f"host {host!r} resolves to {ip}, a {kind} address; set "
                                 "data.allow_private_urls: true only if this source is trusted")
    return infos


def _connect_checked(host: str, port: int, timeout: float | None, allow_private: bool) -> socket.socket:
    """A socket connected to one of the addresses `_resolve` checked (no second DNS lookup that
    could answer differently)."""
    last: OSError | None = None
    for family, kind, proto, _, sockaddr in _resolve(host, port, allow_private):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as e:
            sock.close()
            last = e
    raise last or OSError(f"no address for {host}")


class _Checked:
    """urllib3 connection whose socket goes only to checked addresses, and that acknowledges a
    response's segments at once (`_quickack`)."""

    allow_private = False

    def getresponse(self, *args, **kw):
        _quickack(self.sock)
        return super().getresponse(*args, **kw)

    def _new_conn(self) -> socket.socket:
        try:
            return _connect_checked(self._dns_host, self.port, self.timeout, self.allow_private)
        except FetchError:
            raise
        except TimeoutError as e:
            raise u3.ConnectTimeoutError(self, f"connection to {self.host} timed out") from e
        except OSError as e:
            raise u3.NewConnectionError(self, f"failed to connect: {e}") from e


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only


def _quickack(sock: socket.socket | None) -> None:
    """Ask the kernel to acknowledge what arrives on `sock` at once, not after its delayed-ACK
    timer (40 ms on Linux). On a kept-alive connection the kernel sees request, response,
    request... and delays its ACKs, expecting to send them with data; a server that writes a
    response's headers and body apart with Nagle's algorithm on (Python's http.server, others)
    then holds the body's last partial segment until that ACK comes: +40 ms on many images.
    The mode is not sticky (the kernel leaves it as it sees fit), so it is asked for again
    before each response is read."""
    if _QUICKACK is not None and sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        except OSError:
            pass


_local = threading.local()  # the connection of this thread's request, for its deadline watchdog


def _pool_class(base: type, conn: type, allow_private: bool) -> type:
    class Pool(base):
        ConnectionCls = type(f"Checked{conn.__name__}", (_Checked, conn), {"allow_private": allow_private})

        def _make_request(self, c, *args, **kw):
            holder = getattr(_local, "holder", None)
            if holder is not None:
                holder[0] = c
            return super()._make_request(c, *args, **kw)

    return Pool


_POOLS = {(scheme, private): _pool_class(base, conn, private)
          for scheme, base, conn in (("http", urllib3.HTTPConnectionPool, _U3Connection),
                                     ("https", urllib3.HTTPSConnectionPool, _U3SConnection))
          for private in (False, True)}
_pools: dict[tuple, urllib3.HTTPConnectionPool] = {}
_pools_lock = threading.Lock()


def _pool(t: _Target, allow_private: bool) -> urllib3.HTTPConnectionPool:
    """The keep-alive pool of (scheme, host, port); pools are per trust setting, never shared."""
    key = (t.scheme, t.host, t.port, allow_private)
    with _pools_lock:
        if (pool := _pools.get(key)) is None:
            if len(_pools) >= 1024:  # many distinct hosts: drop the idle connections of all
                for old in _pools.values():
                    old.close()
                _pools.clear()
            pool = _pools[key] = _POOLS[(t.scheme, allow_private)](t.host, t.port, maxsize=POOL_SIZE, block=False)
        return pool


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str  # path + query, percent-encoded


def parse_url(url: str) -> _Target:
    """An http(s) URL split and checked; FetchError("bad_url") for anything else."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
        host = parts.hostname
    except (ValueError, TypeError) as e:  # "Invalid IPv6 URL", a non-numeric port, ...
        raise FetchError("bad_url", f"{url!r} is not a valid URL: {e}") from e
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError("bad_url", f"{url!r}: only http and https URLs are fetched")
    if not host or any(c.isspace() or ord(c) < 32 or c in "\\%" for c in host):
        raise FetchError("bad_url", f"{url!r} has no valid host")
    # Spaces and other characters a browser would encode, encoded; what is already encoded is kept.
    path = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    query = urllib.parse.quote(parts.query, safe="/?%:@!$&'()*+,;=-._~")
    default = 443 if scheme == "https" else 80
    return _Target(scheme, host, port or default, path + (f"?{query}" if query else ""))


class _Deadline:
    """The time left for one fetch; `watch(holder)` shuts the connection in `holder[0]` when it
    runs out, so no read, however slow the server drips, outlives the deadline."""

    def __init__(self, seconds: float):
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self, url: str) -> float:
        left = self.left()
        if left <= 0:
            raise FetchError("http_timeout", f"{url}: not downloaded within data.fetch_timeout_s = {self.seconds}s")
        return left

    def watch(self, holder: list) -> threading.Timer:
        timer = threading.Timer(max(self.left(), 0), _shut, [holder])
        timer.daemon = True
        timer.start()
        return timer


def _shut(holder: list) -> None:
    sock = getattr(holder[0], "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _read_body(resp: urllib3.HTTPResponse, url: str, limits: FetchLimits, deadline: _Deadline) -> bytes:
    """The response body, read a chunk at a time under the byte cap and the deadline."""
    ctype = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if ctype and not ctype.startswith(_OK_TYPES):
        raise FetchError("bad_content_type", f"{url} served {ctype!r}, not an image")
    length = resp.headers.get("Content-Length") or ""
    if length.strip().isdigit() and int(length) > limits.max_bytes:
        raise FetchError("too_large", f"{url} is {int(length)} bytes > data.max_image_bytes = {limits.max_bytes}")
    chunks, total = [], 0
    while chunk := resp.read1(_READ):  # one socket read at a time: the deadline is checked between
        total += len(chunk)
        if total > limits.max_bytes:
            raise FetchError("too_large", f"{url} is larger than data.max_image_bytes = {limits.max_bytes}")
        chunks.append(chunk)
        deadline.check(url)
    deadline.check(url)  # the deadline's watchdog ends a slow body as if the server had closed it
    return b"".join(chunks)


def _release(resp: urllib3.HTTPResponse | None, state: str) -> None:
    """Give the connection back to its pool: as it is after a body read to the end ("done"),
    after reading a short redirect or error body ("drain"), closed otherwise (a closed one is
    reopened when next taken). Called while the deadline's watchdog still runs."""
    if resp is None:
        return
    left = resp.length_remaining
    if state == "drain" and left is not None and left <= _DRAIN:
        resp.drain_conn()
    elif state != "done":
        resp.close()
    resp.release_conn()


def _request(url: str, limits: FetchLimits, deadline: _Deadline) -> tuple[int, str, bytes]:
    """One GET of one URL: (status, Location or Retry-After, body). The body only for a 2xx."""
    t = parse_url(url)
    _resolve(t.host, t.port, limits.allow_private)  # refused before any connection is taken
    timeout = min(limits.timeout_s, deadline.check(url))
    holder: list = [None]
    _local.holder, timer, resp, state = holder, deadline.watch(holder), None, "close"
    try:
        resp = _pool(t, limits.allow_private).urlopen(
            "GET", t.path, headers=_HEADERS, redirect=False, retries=False, preload_content=False,
            decode_content=False, release_conn=False, assert_same_host=False,
            timeout=urllib3.Timeout(connect=timeout, read=timeout))
        if resp.status in _REDIRECTS or not 200 <= resp.status < 300:
            state = "drain"
            return resp.status, resp.headers.get("Location" if resp.status in _REDIRECTS else "Retry-After") or "", b""
        body = _read_body(resp, url, limits, deadline)
        state = "done"
        return resp.status, "", body
    except Exception as e:
        deadline.check(url)  # a connection shut by the deadline: say so, not "connection reset"
        raise _unwrapped(e) from e
    finally:
        try:
            _release(resp, state)
        finally:
            timer.cancel()
            _local.holder = None


def _unwrapped(e: BaseException) -> BaseException:
    """The FetchError urllib3 wrapped (a refused address found when connecting), else `e`."""
    seen = e
    for _ in range(5):
        if isinstance(seen, FetchError):
            return seen
        inner = [a for a in getattr(seen, "args", ()) if isinstance(a, BaseException)]
        seen = getattr(seen, "reason", None) or seen.__cause__ or seen.__context__ or (inner[0] if inner else None)
        if not isinstance(seen, BaseException):
            break
    return e


def _get(url: str, limits: FetchLimits, deadline: _Deadline) -> bytes:
    """GET with redirects followed by hand: each hop parsed and its address checked again."""
    for _ in range(MAX_REDIRECTS + 1):
        status, header, body = _request(url, limits, deadline)
        if status not in _REDIRECTS:
            if status >= 300:
                raise _HTTPStatus(status, url, header)
            return body
        if not header:
            raise FetchError("http_error", f"{url}: HTTP {status} redirect without a Location")
        url = urllib.parse.urljoin(url, header.strip())
    raise FetchError("http_error", f"{url}: more than {MAX_REDIRECTS} redirects")


class _HTTPStatus(Exception):
    def __init__(self, code: int, url: str, retry_after: str = ""):
        super().__init__(code)
        self.code, self.url, self.retry_after = code, url, retry_after


def retry_after_s(value: str) -> float | None:
    """Seconds a `Retry-After` header asks to wait (delay seconds or an HTTP date); None if unreadable."""
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time()) if when else None


_TIMEOUTS = (u3.ConnectTimeoutError, u3.ReadTimeoutError, TimeoutError)
_BROKEN = (u3.NewConnectionError, u3.ProtocolError, ConnectionError)  # refused, reset, cut short


def _attempt(url: str, limits: FetchLimits, deadline: _Deadline) -> tuple[bytes | None, FetchError, Any]:
    """One try: (body, None, _) or (None, the error, False or how to wait before another try:
    True for the usual backoff, seconds for a server's Retry-After)."""
    try:
        return _get(url, limits, deadline), None, False
    except _HTTPStatus as e:
        wait = retry_after_s(e.retry_after) if e.code in (429, 503) and e.retry_after else None
        after = f" (Retry-After: {e.retry_after[:40]})" if wait is not None else ""
        return None, FetchError("http_error", f"{e.url}: HTTP {e.code}{after}"), (
            wait if wait is not None else (e.code == 429 or e.code >= 500))
    except FetchError as e:
        return None, e, False
    except (u3.NewConnectionError, *_BROKEN[1:]) as e:  # before timeouts: a NewConnectionError is one
        return None, FetchError("http_error", f"{url}: {type(e).__name__}: {_short(e)}"), True
    except _TIMEOUTS as e:
        return None, FetchError("http_timeout", f"{url}: no reply within {limits.timeout_s}s ({_short(e)})"), True
    except (http.client.HTTPException, u3.HTTPError, ValueError) as e:  # bad status line, ...
        return None, FetchError("http_error", f"{url}: malformed HTTP response ({type(e).__name__})"), False
    except OSError as e:  # TLS errors, unreachable networks
        reason = getattr(e, "reason", None) or e
        return None, FetchError("http_error", f"{url}: {type(e).__name__}: {reason}"), True


def _short(e: BaseException) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def fetch_http(url: str, limits: FetchLimits) -> bytes:
    """GET within `limits`; retries (inside the deadline) only errors that may pass: timeouts,
    connection errors, 429 and 5xx, after the server's Retry-After (429, 503; at most
    MAX_RETRY_AFTER_S) or a short backoff. Client errors and refusals fail at once."""
    deadline = _Deadline(limits.total_s)
    for attempt in range(limits.retries + 1):
        body, error, again = _attempt(url, limits, deadline)
        if body is not None:
            return body
        if again is False or attempt == limits.retries or deadline.left() <= 0:
            break
        wait = min(0.2 * 2**attempt, 2.0) if again is True else min(float(again), MAX_RETRY_AFTER_S)
        if wait >= deadline.left():
            error = FetchError(error.reason, f"{error.detail}; the next try would pass data.fetch_timeout_s")
            break
        time.sleep(wait)
    raise error


def _read_file(loc: dict, limits: FetchLimits) -> bytes:
    """A local or fsspec file (or a tar member of one), never more than `limits.max_bytes`."""
    uri = loc["uri"]
    if loc["kind"] == "tar" and int(loc["size"]) > limits.max_bytes:
        raise FetchError("too_large", f"{uri} member at {loc['offset']} is {loc['size']} bytes "
                                      f"> data.max_image_bytes = {limits.max_bytes}")
    scheme = scheme_of(uri)
    if scheme and scheme not in SAFE_PROTOCOLS and not limits.allow_private:
        raise FetchError("bad_url", f"{uri!r}: scheme {scheme!r} is not read from an untrusted manifest "
                                    f"(allowed: http, https, {', '.join(sorted(SAFE_PROTOCOLS))}); set "
                                    "data.allow_private_urls: true for a trusted source")
    if "::" in uri and not limits.allow_private:
        raise FetchError("bad_url", f"{uri!r}: chained fsspec URLs are not read from an untrusted manifest")
    with _open(uri) as f:
        if loc["kind"] == "tar":
            f.seek(int(loc["offset"]))
            return f.read(int(loc["size"]))
        data = f.read(limits.max_bytes + 1)
    if len(data) > limits.max_bytes:
        raise FetchError("too_large", f"{uri} is larger than data.max_image_bytes = {limits.max_bytes}")
    return data


def _open(uri: str):
    """Local files through plain `open` (fsspec's local layer costs ~0.1 ms a file), others via
    fsspec. A local path must be a regular file: a FIFO would block, a device never end."""
    scheme = scheme_of(uri)
    if scheme and scheme != "file":
        fs, path = get_fs(uri)
        return fs.open(path, "rb")
    fd = os.open(uri[len("file://"):] if scheme else uri, os.O_RDONLY | os.O_NONBLOCK)  # no wait on a FIFO
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FetchError("unreadable_image", f"{uri} is not a regular file (a device, pipe or socket)")
    return os.fdopen(fd, "rb")


def fetch(loc: dict, timeout: float | None = None, retries: int | None = None,
          limits: FetchLimits | None = None) -> bytes:
    """Bytes for an image locator `{"kind": "path"|"url"|"tar", "uri", ["offset", "size"]}`.

    Raises only `FetchError`. `limits` (`FetchLimits.of(data_cfg)`) bound the read; `timeout`
    and `retries`, when given, replace its per-read timeout and retry count.
    """
    limits = limits or FetchLimits()
    if timeout is not None or retries is not None:
        limits = FetchLimits(limits.timeout_s if timeout is None else timeout,
                             limits.retries if retries is None else retries,
                             limits.total_s, limits.max_bytes, limits.allow_private)
    uri = str(loc.get("uri", ""))
    try:
        if loc.get("kind") == "url" or scheme_of(uri) in ("http", "https"):
            return fetch_http(uri, limits)
        return _read_file(loc, limits)
    except FetchError:
        raise
    except FileNotFoundError as e:
        raise FetchError("missing_image", f"{uri} does not exist") from e
    except IsADirectoryError as e:
        raise FetchError("missing_image", f"{uri} is a directory") from e
    except OSError as e:
        raise FetchError("unreadable_image", f"{uri}: {type(e).__name__}: {e.strerror or e}") from e
    except Exception as e:  # noqa: BLE001 - fsspec and path handling raise many types for odd input
        reason = "bad_url" if scheme_of(uri) else "unreadable_image"
        raise FetchError(reason, f"{uri!r} cannot be read: {type(e).__name__}: {e}") from e
