"""The HTTP API's request bodies over a real server, as the WebUI mounts it and in the standalone server.

A request without credentials is answered (401) before any byte of its body is read, and a body over the API's
limit (1 MB) is refused (413) without being kept: the server must not hold what anyone cares to send it.

The requests go over a socket, a body in two parts: the first, then a wait for an answer, then the rest. A server
that answers before the rest was sent did not read it (it cannot have: it was not there); one that waits for the
whole body answers only after the rest, which the tests see.
"""

from __future__ import annotations

import base64
import http.client
import json
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from ui_helpers import make_instance_images, quick_run_data

from dreambooth_ext.ui.api import PREFIX

pytest_plugins = ("webui_stub.fixtures",)

REPO = Path(__file__).resolve().parent.parent
AUTH = "me:secret"
CREDENTIALS = {"Authorization": "Basic " + base64.b64encode(AUTH.encode()).decode()}
MAX_BODY_BYTES = 1024 * 1024  # the API's limit: a project JSON is a few KB
LARGE = 20 * 1024 * 1024
PIECE = 64 * 1024


@dataclass
class Answer:
    status: int
    body: dict
    answered_early: bool  # the answer came before the rest of the body was sent
    sent: int  # body bytes sent when the answer came


@dataclass
class Server:
    url: str
    images: Path
    checkpoint: str | None  # the `checkpoint` query a run needs here (None: the host's loaded model)


def zeros(total: int) -> Iterator[bytes]:
    """`total` bytes in pieces, made as they are sent: the test never holds the body."""
    while total > 0:
        yield bytes(min(PIECE, total))
        total -= PIECE


def chunked(pieces: Iterator[bytes]) -> Iterator[bytes]:
    for piece in pieces:
        yield b"%x\r\n%s\r\n" % (len(piece), piece)


def post_in_two_parts(url: str, path: str, headers: dict, first: Iterator[bytes], rest: Iterator[bytes],
                      wait: float = 20.0) -> Answer:
    """POST with the body's first part, wait up to `wait` s for an answer, send the rest only if none came."""
    where = urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=120) as sock:
        head = [f"POST {path} HTTP/1.1", f"Host: {where.netloc}"] + [f"{k}: {v}" for k, v in headers.items()]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        sent = 0
        for piece in first:
            sock.sendall(piece)
            sent += len(piece)
        answered_early = bool(select.select([sock], [], [], wait)[0])
        if not answered_early:
            for piece in rest:
                sock.sendall(piece)
                sent += len(piece)
        response = http.client.HTTPResponse(sock, method="POST")
        response.begin()
        body = response.read()
        return Answer(response.status, json.loads(body) if body else {}, answered_early, sent)


def post_json(url: str, path: str, data, headers: dict) -> Answer:
    body = json.dumps(data).encode()
    headers = dict(headers, **{"Content-Type": "application/json", "Content-Length": str(len(body))})
    return post_in_two_parts(url, path, headers, iter([body]), iter([]), wait=120)


def wait_until_settled(url: str, timeout: float = 120) -> dict:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        request = urllib.request.Request(url.rstrip("/") + f"{PREFIX}/status", headers=CREDENTIALS)
        with urllib.request.urlopen(request, timeout=30) as reply:
            status = json.loads(reply.read())
        if not status["active"]:
            return status
        time.sleep(0.2)
    raise AssertionError(f"run still active after {timeout}s: {status}")


@pytest.fixture
def standalone(ui_models, ui_images, tmp_path) -> Iterator[Server]:
    from dreambooth_ext.ui.standalone import serve

    app = serve(ui_models, tmp_path / "work", port=None, api_auth=AUTH)
    try:
        yield Server(app.url, ui_images, "tiny.safetensors")
    finally:
        app.close()


@pytest.fixture
def in_webui(make_webui, tmp_path) -> Iterator[Server]:
    """The stand-in host started with --api-auth, serving its page as the WebUI does (gradio's launch), the
    extension's routes added to that app by its app-started callback."""
    from webui_stub import load_extension as loader

    make_webui("--api-auth", AUTH)
    (module,) = loader.load_scripts(REPO)
    loader.build_ui()
    from modules import shared

    from dreambooth_ext.ui.standalone import stop_server

    app, url, _ = shared.demo.launch(prevent_thread_lock=True, quiet=True, show_api=False)
    loader.start_app(app, shared.demo)
    try:
        yield Server(url, make_instance_images(tmp_path / "photos"), None)
    finally:
        module.jobs.shutdown(30)
        if stop_server(shared.demo, 3.0):
            shared.demo.close()


@pytest.fixture(params=["standalone", "in_webui"])
def server(request) -> Server:
    return request.getfixturevalue(request.param)


def test_a_large_body_without_credentials_is_refused_before_it_is_read(server):
    headers = {"Content-Type": "application/json", "Content-Length": str(LARGE)}
    answer = post_in_two_parts(server.url, f"{PREFIX}/start", headers, iter([]), zeros(LARGE))
    assert answer.status == 401 and answer.answered_early and answer.sent == 0, answer

    sent_in_pieces = dict(headers, **{"Transfer-Encoding": "chunked"})
    del sent_in_pieces["Content-Length"]
    answer = post_in_two_parts(server.url, f"{PREFIX}/start", sent_in_pieces, iter([]), chunked(zeros(LARGE)))
    assert answer.status == 401 and answer.answered_early, answer


def test_a_body_over_the_limit_is_413_naming_the_limit(server):
    declared = dict(CREDENTIALS, **{"Content-Type": "application/json", "Content-Length": str(LARGE)})
    answer = post_in_two_parts(server.url, f"{PREFIX}/start", declared, iter([]), zeros(LARGE))
    assert answer.status == 413 and answer.answered_early and answer.sent == 0, answer
    assert "1 MB" in answer.body["detail"]["message"]

    # No Content-Length (chunked): read up to the limit, then refused without the rest.
    undeclared = dict(CREDENTIALS, **{"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    over = MAX_BODY_BYTES + PIECE
    answer = post_in_two_parts(server.url, f"{PREFIX}/start", undeclared, chunked(zeros(over)),
                               chunked(zeros(LARGE - over)))
    assert answer.status == 413 and answer.answered_early and answer.sent < LARGE, answer
    assert "1 MB" in answer.body["detail"]["message"]


def test_a_project_json_with_credentials_still_starts_a_run(server):
    data = quick_run_data("", server.images, project="limits")
    path = f"{PREFIX}/start" + (f"?checkpoint={server.checkpoint}" if server.checkpoint else "")
    assert post_json(server.url, path, data, {}).status == 401
    answer = post_json(server.url, path, data, CREDENTIALS)
    assert answer.status == 200 and answer.body["started"] is True, answer
    status = wait_until_settled(server.url)
    assert status["state"] == "finished" and status["step"] == 2, status

    for bad, problem in ((b"{not json", "not JSON"), (b"[1, 2]", "JSON object"), (b"", "JSON object")):
        headers = dict(CREDENTIALS, **{"Content-Type": "application/json", "Content-Length": str(len(bad))})
        answer = post_in_two_parts(server.url, path, headers, iter([bad]), iter([]), wait=120)
        assert answer.status == 422 and problem in json.dumps(answer.body), (bad, answer)


def test_the_standalone_servers_own_page_routes_refuse_a_large_body_unread(standalone):
    """gradio's routes (/run/predict, the page's button calls) read a body before their login check: the
    standalone server, all of whose routes are the extension's, caps every body at the same limit."""
    headers = {"Content-Type": "application/json", "Content-Length": str(LARGE)}
    answer = post_in_two_parts(standalone.url, "/run/predict", headers, iter([]), zeros(LARGE))
    assert answer.status == 413 and answer.answered_early and answer.sent == 0, answer
    assert "1 MB" in answer.body["detail"]["message"]

    undeclared = {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    over = MAX_BODY_BYTES + PIECE
    answer = post_in_two_parts(standalone.url, "/run/predict", undeclared, chunked(zeros(over)),
                               chunked(zeros(LARGE - over)))
    assert answer.status == 413 and answer.answered_early and answer.sent < LARGE, answer

    small = post_json(standalone.url, "/run/predict", {"data": [], "fn_index": 0}, {})
    assert small.status == 401, small  # a small body still reaches gradio's own login check
