"""A Webflow-like site for browser tests: Webflow's export markup, a native Webflow form and a small
webflow.js that intercepts submit as Webflow's does (tests/browser/webflow/), served on its own
loopback origin with the tag pasted into its <head> exactly as ``pingtree-relay snippet`` prints it.

Also :class:`HoldingProxy`, a loopback HTTP proxy in front of the relay that can hold an answer
(its headers sent, its body withheld) so that a test can leave the page at exactly that moment.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from server.config import load_config
from server.sdk import csp_sources, snippet_tag
from tests.conftest import campaigns_toml

SITE = Path(__file__).resolve().parent / "webflow"
PLACEHOLDER = b"<!--PT_SNIPPET-->"


class WebflowSite:
    """The site's origin, the tag its pages carry (``snippet``) and the CSP header they get (``csp``)."""

    def __init__(self) -> None:
        self.snippet = ""
        self.csp = ""
        # Port 0: the kernel picks, and the bound socket is the one that serves (no pick-then-bind race).
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_SiteHandler, self, directory=str(SITE)))
        self.port = int(self._server.server_address[1])
        self.origin = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> WebflowSite:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def url(self, page: str = "index.html", **params: str) -> str:
        return f"{self.origin}/{page}" + (f"?{urlencode(params)}" if params else "")

    def paste(
        self, relay: Any, *, base: str | None = None, stub: bool = True, strict_csp: bool = False
    ) -> None:
        """Paste the relay's tag for cmp_test (what ``snippet`` prints); with ``strict_csp``, serve
        the pages under a CSP made of what ``snippet --csp`` prints (plus 'self' for webflow.js)."""
        config = load_config(relay.config_path)
        self.snippet = snippet_tag(config, "cmp_test", base or relay.url, stub=stub)
        self.csp = ""
        if strict_csp:
            sources = csp_sources(config, "cmp_test", base or relay.url)
            if not stub:
                sources["script-src"] = [s for s in sources["script-src"] if not s.startswith("'sha256-")]
            self.csp = (
                "default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; form-action 'self'; "
                f"script-src 'self' {' '.join(sources['script-src'])}; "
                f"connect-src {' '.join(sources['connect-src'])}"
            )


class _SiteHandler(SimpleHTTPRequestHandler):
    def __init__(self, site: WebflowSite, *args: Any, **kwargs: Any) -> None:
        self.site = site
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        path = self.path.split("?", 1)[0]
        if not path.endswith(".html"):
            super().do_GET()
            return
        file = SITE / path.lstrip("/")
        if not file.is_file() or SITE not in file.resolve().parents:
            self.send_error(404)
            return
        body = file.read_bytes().replace(PLACEHOLDER, self.site.snippet.encode())
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if self.site.csp:
            self.send_header("Content-Security-Policy", self.site.csp)
        self.end_headers()
        self.wfile.write(body)

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def site() -> Iterator[WebflowSite]:
    """A fresh Webflow-like site on its own loopback origin (allow it with :func:`site_campaigns`)."""
    server = WebflowSite().start()
    yield server
    server.stop()


def site_campaigns(
    pages_port: int, site: WebflowSite, *, staging: bool = False, campaign: str = "", sdk: str = ""
) -> str:
    """The shared test campaigns, with the site's origin allowed for cmp_test (or as a staging origin).

    ``campaign`` and ``sdk`` are extra TOML lines for ``[campaigns.cmp_test]`` and its ``.sdk`` table.
    """
    toml = campaigns_toml(pages_port)
    if staging:
        campaign = f'staging_origins = ["{site.origin}"]\n' + campaign
    else:
        toml = toml.replace("allowed_origins = [", f'allowed_origins = ["{site.origin}", ', 1)
    toml = toml.replace("[campaigns.cmp_test]\n", "[campaigns.cmp_test]\n" + campaign, 1)
    return toml + '\n[campaigns.cmp_test.sdk]\ncall_event = "call_clicked"\n' + sdk


# --- holding an answer ----------------------------------------------------------------------------


class HoldingProxy:
    """Forwards every request to ``upstream``; with ``hold`` set, the next POST's answer is held.

    ``hold = "body"``: the status line and headers go out at once (the page's fetch() resolves) and
    the body waits for :meth:`release`: the moment between "headers arrived" and "body read".
    ``hold = "all"``: nothing goes out until released (the request is still in flight).
    ``headers_out`` / ``request_in`` are set when the held answer reached that point.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.hold = ""
        self.posts: list[bytes] = []
        self.request_in = threading.Event()
        self.headers_out = threading.Event()
        self._release = threading.Event()
        self._client = httpx.Client(timeout=15)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_ProxyHandler, self))
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def release(self) -> None:
        self._release.set()

    def close(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()
        self._client.close()

    def forward(self, method: str, path: str, headers: dict[str, str], body: bytes | None) -> httpx.Response:
        keep = {
            k: v
            for k, v in headers.items()
            if k.lower() in ("origin", "content-type", "user-agent", "if-none-match")
        }
        keep["Accept-Encoding"] = "identity"  # pass the bytes through untouched (SRI, Content-Length)
        return self._client.request(method, self.upstream + path, headers=keep, content=body)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def __init__(self, proxy: HoldingProxy, *args: Any, **kwargs: Any) -> None:
        self.proxy = proxy
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(self.proxy.forward("GET", self.path, dict(self.headers), None), hold="")

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.proxy.posts.append(body)
        hold, self.proxy.hold = self.proxy.hold, ""  # the next POST only
        if hold:
            self.proxy.request_in.set()
        self._answer(self.proxy.forward("POST", self.path, dict(self.headers), body), hold=hold)

    def _answer(self, upstream: httpx.Response, *, hold: str) -> None:
        if hold == "all":
            self.proxy._release.wait(30)
        self.send_response(upstream.status_code)
        for key, value in upstream.headers.items():
            if key.lower() not in (
                "content-length",
                "transfer-encoding",
                "connection",
                "content-encoding",
                "date",
                "server",
            ):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(upstream.content)))
        self.end_headers()
        try:
            self.wfile.flush()
            if hold == "body":
                self.proxy.headers_out.set()
                self.proxy._release.wait(30)
            self.wfile.write(upstream.content)
            self.wfile.flush()
        except OSError:
            pass  # the page is gone and Chromium dropped the connection: fine, that is the point

    def log_message(self, *args: Any) -> None:
        pass
