"""The API's /docs and /redoc in headless Chromium with the network cut off: the pages render the
operations from assets the API serves itself. No Redis is needed: the docs never touch it.

The screenshots are kept in ``artifacts/api-docs.png`` and ``artifacts/api-redoc.png``.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

from producer.api import create_app
from producer.client import EchoqClient
from tests.conftest import TEST_REDIS_URL
from tests.integration.conftest import wait_for
from tests.integration.test_flower_browser import ARTIFACTS, chromium, chromium_or_skip

#: every request that does not go to the API itself goes to a port nobody listens on: offline
OFFLINE = ("--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1")


@dataclass
class Docs:
    url: str
    operation_ids: list[str]


@pytest.fixture
def docs() -> Iterator[Docs]:
    """The API (auth on, a token nobody sends) under uvicorn on a free port of 127.0.0.1."""
    app = create_app(tokens=["docs-test-token-5e1f"], client=EchoqClient(TEST_REDIS_URL))
    ops = [op["operationId"] for item in app.openapi()["paths"].values() for op in item.values()]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 10, what="uvicorn to start")
        yield Docs(f"http://127.0.0.1:{sock.getsockname()[1]}", ops)
    finally:
        server.should_exit = True
        thread.join(10)


def test_docs_pages_load_only_local_assets_without_a_token(docs: Docs) -> None:
    with httpx.Client(base_url=docs.url, timeout=10) as http:
        for page in ("/docs", "/redoc"):
            r = http.get(page)
            assert r.status_code == 200, (page, r.status_code)
            assets = re.findall(r'(?:src|href)="([^"]+)"', r.text)
            assert assets and all(a.startswith("/") for a in assets), (page, assets)  # nothing from a CDN
            for asset in assets:
                assert http.get(asset).status_code == 200, asset
        assert http.get("/v1/utterances/x").status_code == 401  # the API itself still needs a token


@pytest.mark.parametrize("page, shot, rendered", [
    # Swagger UI: an operation block per route
    ("/docs", "api-docs.png", r'class="opblock opblock-post'),
    # ReDoc: the operations in its side menu
    ("/redoc", "api-redoc.png", r'role="menuitem" aria-label="Send Text Message"'),
])
def test_docs_render_the_operations_offline_in_headless_chromium(docs: Docs, page: str, shot: str,
                                                                   rendered: str) -> None:
    browser = chromium_or_skip()
    done = chromium(browser, docs.url + page, *OFFLINE, "--dump-dom")
    dom = done.stdout
    assert re.search(rendered, dom), f"{page} did not render its operations:\n{done.stderr[-2000:]}"
    # both pages link every operation by its id once the spec was fetched and rendered
    missing = [op for op in docs.operation_ids if op not in dom]
    assert len(docs.operation_ids) >= 18 and not missing, f"{page} lacks {missing}"

    ARTIFACTS.mkdir(exist_ok=True)
    target = ARTIFACTS / shot
    target.unlink(missing_ok=True)
    done = chromium(browser, docs.url + page, *OFFLINE, f"--screenshot={target}", "--window-size=1280,1600",
                    "--hide-scrollbars")
    assert target.is_file() and target.stat().st_size > 10_000, done.stderr[-2000:]
