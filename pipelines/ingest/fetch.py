"""Reading an image's bytes from wherever a source points: local or fsspec paths (s3://...),
http(s) URLs, or a byte range of a tar file.

A manifest is untrusted input, so every locator is bounded: in bytes (`data.max_image_bytes`),
in time (`data.fetch_timeout_s` for the whole download, `data.http_timeout_s` for each read) and,
for URLs, in where it may lead. HTTP redirects are followed here, not by a library, so that every
hop's address is checked after DNS resolution, and the connection goes to the address checked:
loopback, private, link-local (cloud metadata lives at 169.254.169.254) and multicast addresses
are refused unless `data.allow_private_urls` is set. Every failure is a `FetchError` with a report
reason, whatever the input looks like.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import stat
import threading
import time
import urllib.parse
from dataclasses import dataclass

from pipelines.config import DataConfig
from pipelines.core.storage import get_fs

_OK_TYPES = ("image/", "application/octet-stream", "binary/octet-stream")
_REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
_READ = 64 * 1024
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


def _resolve(host: str, port: int, allow_private: bool) -> list[tuple]:
    """getaddrinfo for `host`; a FetchError when any address it has is not public."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as e:
        raise FetchError("http_error", f"cannot resolve host {host!r}: {e}") from e
    if not allow_private:
        for info in infos:
            ip = ipaddress.ip_address(info[4][0].split("%")[0])
            if kind := _blocked(ip):
                raise FetchError("blocked_address", f"host {host!r} resolves to {ip}, a {kind} address; set "
                                 "data.allow_private_urls: true only if this source is trusted")
    return infos


def _checked_connection(allow_private: bool):
    """`socket.create_connection` that connects only to the addresses `_resolve` checked (no
    second DNS lookup that could answer differently)."""

    def create(address, timeout=None, source_address=None, **_):
        host, port = address
        last: OSError | None = None
        for family, kind, proto, _, sockaddr in _resolve(host, port, allow_private):
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(timeout)
                sock.connect(sockaddr)
                return sock
            except OSError as e:
                sock.close()
                last = e
        raise last or OSError(f"no address for {host}")

    return create


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
    """The time left for one fetch; `watch(conn)` closes the connection when it runs out, so no
    read, however slow the server drips, outlives the deadline."""

    def __init__(self, seconds: float):
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self, url: str) -> float:
        left = self.left()
        if left <= 0:
            raise FetchError("http_timeout", f"{url}: not downloaded within data.fetch_timeout_s = {self.seconds}s")
        return left

    def watch(self, conn: http.client.HTTPConnection) -> threading.Timer:
        timer = threading.Timer(max(self.left(), 0), _shut, [conn])
        timer.daemon = True
        timer.start()
        return timer


def _shut(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _read_body(resp: http.client.HTTPResponse, url: str, limits: FetchLimits, deadline: _Deadline) -> bytes:
    """The response body, read a chunk at a time under the byte cap and the deadline."""
    ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
    if ctype and not ctype.startswith(_OK_TYPES):
        raise FetchError("bad_content_type", f"{url} served {ctype!r}, not an image")
    length = resp.getheader("Content-Length") or ""
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
    if resp.length:  # fewer bytes than Content-Length announced
        raise FetchError("http_error", f"{url}: connection closed {resp.length} bytes before the end")
    return b"".join(chunks)


def _request(url: str, limits: FetchLimits, deadline: _Deadline) -> tuple[int, str, bytes]:
    """One GET of one URL: (status, Location, body). The body only for a 2xx."""
    t = parse_url(url)
    kind = http.client.HTTPSConnection if t.scheme == "https" else http.client.HTTPConnection
    conn = kind(t.host, t.port, timeout=min(limits.timeout_s, deadline.check(url)))
    conn._create_connection = _checked_connection(limits.allow_private)
    timer = deadline.watch(conn)
    try:
        conn.request("GET", t.path, headers={"User-Agent": "mmfusion-ingest/0.1", "Accept": "image/*"})
        resp = conn.getresponse()
        if resp.status in _REDIRECTS:
            return resp.status, resp.getheader("Location") or "", b""
        if not 200 <= resp.status < 300:
            return resp.status, "", b""
        return resp.status, "", _read_body(resp, url, limits, deadline)
    except Exception:
        deadline.check(url)  # a connection shut by the deadline: say so, not "connection reset"
        raise
    finally:
        timer.cancel()
        conn.close()


def _get(url: str, limits: FetchLimits, deadline: _Deadline) -> bytes:
    """GET with redirects followed by hand: each hop parsed and its address checked again."""
    for _ in range(MAX_REDIRECTS + 1):
        status, location, body = _request(url, limits, deadline)
        if status not in _REDIRECTS:
            if status >= 300:
                raise _HTTPStatus(status, url)
            return body
        if not location:
            raise FetchError("http_error", f"{url}: HTTP {status} redirect without a Location")
        url = urllib.parse.urljoin(url, location.strip())
    raise FetchError("http_error", f"{url}: more than {MAX_REDIRECTS} redirects")


class _HTTPStatus(Exception):
    def __init__(self, code: int, url: str):
        super().__init__(code)
        self.code, self.url = code, url


def _attempt(url: str, limits: FetchLimits, deadline: _Deadline) -> tuple[bytes | None, FetchError, bool]:
    """One try: (body, None, _) or (None, the error, whether another try may help)."""
    try:
        return _get(url, limits, deadline), None, False
    except _HTTPStatus as e:
        return None, FetchError("http_error", f"{e.url}: HTTP {e.code}"), e.code == 429 or e.code >= 500
    except FetchError as e:
        return None, e, False
    except TimeoutError as e:
        return None, FetchError("http_timeout", f"{url}: no reply within {limits.timeout_s}s ({e})"), True
    except ConnectionError as e:  # refused, reset, closed before a status line
        return None, FetchError("http_error", f"{url}: {type(e).__name__}: {e}"), True
    except (http.client.HTTPException, ValueError) as e:  # bad chunking, bad status line, ...
        return None, FetchError("http_error", f"{url}: malformed HTTP response ({type(e).__name__})"), False
    except OSError as e:  # TLS errors, unreachable networks
        reason = getattr(e, "reason", None) or e
        return None, FetchError("http_error", f"{url}: {type(e).__name__}: {reason}"), True


def fetch_http(url: str, limits: FetchLimits) -> bytes:
    """GET within `limits`; retries (with backoff, inside the deadline) only errors that may pass:
    timeouts, connection errors, 429 and 5xx. Client errors and refusals fail at once."""
    deadline = _Deadline(limits.total_s)
    for attempt in range(limits.retries + 1):
        if attempt:
            time.sleep(min(0.2 * 2 ** (attempt - 1), 2.0, max(deadline.left(), 0)))
        body, error, again = _attempt(url, limits, deadline)
        if body is not None:
            return body
        if not again or deadline.left() <= 0:
            break
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
