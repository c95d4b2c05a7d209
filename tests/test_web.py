"""The web demo (``pill serve``): request handling over real HTTP, then the page in headless Chromium.

The browser test needs Debian's chromium and chromium-driver (``.ci/install-browser``; ``make test``
installs them where it runs as root). Without them it is skipped with a line that says how to
enable it, except under CI=true, where it must run and fails instead.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from pill.web import DemoApp, Limits, RequestError, make_server, serve_in_thread, validate_settings
from pill.web.app import validate_history

EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "pill" / "web" / "examples"
FAKE_INFO = {"llm": "fake llm", "vpg": "fake vpg", "run_dir": None, "stages": [], "trained": False,
             "parameters": [{"part": "total", "parameters": 10, "trainable": 2}]}


def png_bytes(size=(32, 32), colour="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


class FakeVLM:
    """Stands in for PillVLM.chat: streams ``pieces`` with a delay and records overlapping calls."""

    def __init__(self, pieces=("a", " red", " circle"), delay=0.0, gate: threading.Event | None = None):
        self.pieces, self.delay, self.gate = pieces, delay, gate
        self.active = self.max_active = self.calls = 0
        self.seen = []
        self._lock = threading.Lock()

    def chat(self, prompt, images=(), history=None, stream=None, **settings):
        with self._lock:
            self.active += 1
            self.calls += 1
            self.max_active = max(self.max_active, self.active)
            self.seen.append({"prompt": prompt, "images": list(images), "history": history, **settings})
        try:
            if self.gate is not None:
                self.gate.wait(10)
            if "boom" in prompt:
                raise RuntimeError("the model exploded")
            for p in self.pieces:
                time.sleep(self.delay)
                stream(p)
            return "".join(self.pieces).strip()
        finally:
            with self._lock:
                self.active -= 1


class Client:
    """Minimal HTTP client for one demo server."""

    def __init__(self, server):
        self.server = server
        self.url = server.url

    def request(self, method, path, body=None, headers=None):
        req = urllib.request.Request(self.url + path.lstrip("/"), data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def upload(self, data: bytes, content_type="image/png"):
        status, _, body = self.request("POST", "/api/image", data, {"Content-Type": content_type})
        return status, json.loads(body)

    def chat(self, question, image_id=None, history=None, settings=None, content_type="application/json"):
        payload = {"question": question, "image_id": image_id, "history": history or [],
                   "settings": settings or {}}
        status, headers, body = self.request("POST", "/api/chat", json.dumps(payload).encode(),
                                             {"Content-Type": content_type})
        if headers.get("Content-Type", "").startswith("application/json"):
            return status, json.loads(body)
        return status, parse_events(body.decode())


def parse_events(text: str) -> list[tuple[str, object]]:
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def answer_of(events) -> str:
    assert events[-1][0] == "done", events
    return events[-1][1]["answer"]


def start(app_or_vlm, **kw):
    server = make_server(app_or_vlm, "127.0.0.1", 0, **kw)
    serve_in_thread(server)
    return server


@pytest.fixture(scope="module")
def tiny_demo_vlm():
    import torch

    from pill.models import build_llm_from_config, load_tokenizer
    from pill.vlm import PillVLM
    from pill.encoders.efficientnet import EfficientNetVPG

    torch.manual_seed(0)
    return PillVLM(build_llm_from_config("llama"), EfficientNetVPG(pretrained=False, pool=2), load_tokenizer())


@pytest.fixture(scope="module")
def tiny_server(tiny_demo_vlm):
    server = start(tiny_demo_vlm, limits=Limits(max_upload_bytes=200_000, max_pixels=512 * 512))
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def client(tiny_server):
    return Client(tiny_server)


@pytest.fixture
def fake_client():
    """``fake_client(vlm, **limits)``: a client of a fresh server around a fake model, closed after the test."""
    servers = []

    def make(vlm, info=FAKE_INFO, **limits):
        servers.append(start(DemoApp(vlm, info, Limits(**limits))))
        return Client(servers[-1])

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


# -- validation without HTTP ---------------------------------------------------------------------
def test_settings_defaults_and_conversion():
    assert validate_settings(None) == {"max_new_tokens": 128, "do_sample": False, "temperature": 0.7, "top_p": 0.9}
    out = validate_settings({"max_new_tokens": 16.0, "greedy": False, "temperature": 1, "top_p": 0.5})
    assert out == {"max_new_tokens": 16, "do_sample": True, "temperature": 1.0, "top_p": 0.5}
    assert type(out["max_new_tokens"]) is int


@pytest.mark.parametrize("settings, field", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": 100000}, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"), ({"max_new_tokens": "64"}, "max_new_tokens"),
    ({"max_new_tokens": True}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
    ({"temperature": 50}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"greedy": "yes"}, "greedy"), ({"beams": 4}, "beams"),
])
def test_settings_out_of_range_name_the_field(settings, field):
    with pytest.raises(RequestError, match=field) as e:
        validate_settings(settings)
    assert e.value.status == 400


def test_history_is_checked_and_neutralised():
    limits = Limits(max_history_messages=4)
    ok = [{"role": "user", "content": "what is <image>?"}, {"role": "assistant", "content": "a cat"}]
    assert validate_history(ok, limits)[0]["content"] == "what is (image)?"
    for bad in ([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}],
                [{"role": "user", "content": "only a question"}], "not a list", [{"role": "user"}],
                ok * 3):
        with pytest.raises(RequestError):
            validate_history(bad, limits)


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="max_pixels"):
        Limits(max_pixels=0)


def test_uploads_kept_in_memory_are_bounded():
    app = DemoApp(FakeVLM(), FAKE_INFO, Limits(max_inputs=2))
    ids = [app.add_image(png_bytes((8 + i, 8)))["image_id"] for i in range(3)]
    with pytest.raises(RequestError, match="upload it again") as e:
        app.get_image(ids[0])
    assert e.value.status == 410 and app.get_image(ids[2]).size == (10, 8)
    big = app.add_image(png_bytes((1500, 300)))
    assert (big["width"], big["height"]) == (1500, 300) and app.get_image(big["image_id"]).size == (1024, 205)


def test_loopback_detection():
    from pill.web.server import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.5", "localhost.evil.example", "example.com", ""))


def test_examples_are_the_generator_output(tmp_path):
    from pill.web.make_examples import EXAMPLES as SPECS, main

    main(tmp_path)
    index = json.loads((EXAMPLES / "examples.json").read_text())
    assert index == json.loads((tmp_path / "examples.json").read_text())
    assert [e["file"] for e in index] == list(SPECS)
    for name in SPECS:
        committed, fresh = Image.open(EXAMPLES / name), Image.open(tmp_path / name)
        assert committed.size == fresh.size == (128, 128)
        assert committed.convert("RGB").tobytes() == fresh.convert("RGB").tobytes(), name


# -- the server with the tiny model --------------------------------------------------------------
def test_page_info_and_static_files(client):
    status, headers, body = client.request("GET", "/")
    assert status == 200 and b"PILL demo" in body and "default-src 'self'" in headers["Content-Security-Policy"]
    for path in ("/static/app.js", "/static/style.css", "/examples/red-circle.png", "/examples/examples.json"):
        assert client.request("GET", path)[0] == 200, path
    for path in ("/static/../server.py", "/static/%2e%2e/server.py", "/examples/nope.png", "/api/nothing",
                 "/api/gates.png"):
        assert client.request("GET", path)[0] == 404, path
    info = json.loads(client.request("GET", "/api/info")[2])
    assert info["trained"] is False and info["run_dir"] is None and info["gate_plot"] is False
    assert info["parameters"][-1]["part"] == "total" and info["parameters"][-1]["trainable"] > 0
    assert info["limits"]["max_upload_bytes"] == 200_000
    assert info["settings"]["max_new_tokens"] == {"min": 1, "max": 512, "default": 128}


def test_upload_then_streamed_multi_turn_answer(client):
    status, img = client.upload(png_bytes((40, 30)))
    assert status == 200 and (img["width"], img["height"]) == (40, 30)
    status, events = client.chat("What colour is it?", img["image_id"], settings={"max_new_tokens": 6})
    assert status == 200 and events[0][0] == "start"
    tokens = [d for e, d in events if e == "token"]
    first = answer_of(events)
    assert 1 <= len(tokens) <= 6 and "".join(tokens).strip() == first
    history = [{"role": "user", "content": "What colour is it?"}, {"role": "assistant", "content": first}]
    status, events = client.chat("And its shape?", img["image_id"], history, {"max_new_tokens": 4})
    assert status == 200 and answer_of(events) is not None
    status, events = client.chat("No image this time", None, settings={"max_new_tokens": 3})
    assert status == 200 and events[-1][0] == "done"


@pytest.mark.parametrize("data, content_type, status, message", [
    (b"hello, I am text", "image/png", 400, "not an image"),
    (png_bytes()[:60], "image/png", 400, "corrupt or truncated"),
    (b"", "image/png", 400, "empty"),
    (png_bytes((600, 600)), "image/png", 400, "above the limit of 262144"),
    (os.urandom(300_000), "image/png", 413, "limit is 0.2 MB"),
    (png_bytes(), "text/plain", 415, "Content-Type image"),
])
def test_bad_uploads_get_a_clear_message_and_the_server_keeps_serving(client, data, content_type, status, message):
    got, reply = client.upload(data, content_type)
    assert got == status and message in reply["error"], reply
    assert client.upload(png_bytes())[0] == 200


def test_bad_questions_are_refused_before_the_model_runs(client):
    _, img = client.upload(png_bytes())
    cases = [
        (dict(question="  "), 400, "type a question"),
        (dict(question="what is <image>?"), 400, "remove '<image>'"),
        (dict(question="x" * 5000), 400, "limit is 2000"),
        (dict(question="hi", image_id="no-such-image"), 410, "upload it again"),
        (dict(question="hi", settings={"temperature": 9}), 400, "temperature"),
        (dict(question="hi", history=[{"role": "bot", "content": "x"}]), 400, "history message 0"),
        (dict(question="hi", content_type="text/plain"), 415, "JSON"),
    ]
    for kwargs, status, message in cases:
        got, reply = client.chat(**{"image_id": img["image_id"], **kwargs})
        assert got == status and message in reply["error"], (kwargs, reply)
    status, _, body = client.request("POST", "/api/chat", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]


def test_only_loopback_host_names_are_served_on_loopback(client):
    port = client.server.server_address[1]
    assert client.request("GET", "/api/info", headers={"Host": f"localhost:{port}"})[0] == 200
    status, _, body = client.request("GET", "/api/info", headers={"Host": "evil.example"})
    assert status == 403 and "Host" in json.loads(body)["error"]


# -- queueing and failures, with a fake model -----------------------------------------------------
def test_concurrent_questions_are_queued_not_run_in_parallel(fake_client):
    gate = threading.Event()
    vlm = FakeVLM(delay=0.02, gate=gate)
    client = fake_client(vlm)
    results = []

    def ask(i):
        results.append(client.chat(f"question {i}"))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    _wait_for(lambda: vlm.active == 1 and client.server.app._waiting == 3)
    gate.set()
    for t in threads:
        t.join(30)
    assert len(results) == 4 and all(s == 200 and answer_of(ev) == "a red circle" for s, ev in results)
    assert vlm.calls == 4 and vlm.max_active == 1
    queued = [ev for _, ev in results if ev[0][0] == "queued"]
    assert sorted(ev[0][1]["ahead"] for ev in queued) == [1, 2, 3]


def test_a_full_queue_answers_503_and_a_failing_request_does_not_stop_the_server(fake_client):
    gate = threading.Event()
    vlm = FakeVLM(gate=gate)
    client = fake_client(vlm, max_waiting=1)
    results = {}
    first = threading.Thread(target=lambda: results.__setitem__("first", client.chat("boom, please")))
    second = threading.Thread(target=lambda: results.__setitem__("second", client.chat("second")))
    first.start()
    _wait_for(lambda: vlm.active == 1)
    second.start()
    _wait_for(lambda: client.server.app._waiting == 1)
    status, reply = client.chat("third")
    assert status == 503 and "busy" in reply["error"]
    gate.set()
    first.join(10)
    second.join(10)
    status, events = results["first"]
    assert status == 200 and events[-1] == ("error", {"message": "the model failed on this question: "
                                                                 "RuntimeError: the model exploded"})
    assert answer_of(results["second"][1]) == "a red circle"
    assert answer_of(client.chat("after the failure")[1]) == "a red circle"


def test_a_client_that_goes_away_releases_the_model(fake_client):
    vlm = FakeVLM(pieces=["x"] * 200, delay=0.01)
    client = fake_client(vlm)
    host, port = client.server.server_address[:2]
    body = json.dumps({"question": "long answer please"}).encode()
    with socket.create_connection((host, port)) as s:
        s.sendall(b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        received = b""
        while b"event: token" not in received:
            chunk = s.recv(4096)
            assert chunk, received
            received += chunk
    _wait_for(lambda: not client.server.app.busy, timeout=10)
    vlm.pieces = ["ok"]
    assert answer_of(client.chat("next")[1]) == "ok"


def test_settings_reach_the_model(fake_client):
    vlm = FakeVLM()
    client = fake_client(vlm)
    _, img = client.upload(png_bytes((20, 10)))
    client.chat("hi", img["image_id"], settings={"max_new_tokens": 7, "greedy": False, "temperature": 0.5})
    seen = vlm.seen[-1]
    assert (seen["max_new_tokens"], seen["do_sample"], seen["temperature"], seen["top_p"]) == (7, True, 0.5, 0.9)
    assert seen["images"][0].size == (20, 10) and seen["history"] == []


def test_run_directory_info_and_gate_plot(tmp_path, fake_client):
    pytest.importorskip("matplotlib")
    gates = {"layers": [0, 1], "mean_abs_gate": [0.1, 0.3], "variant": "token"}
    (tmp_path / "gates.json").write_text(json.dumps(gates))
    info = {**FAKE_INFO, "run_dir": str(tmp_path), "trained": True, "stages": ["align", "finetune"]}
    client = fake_client(FakeVLM(), info)
    got = json.loads(client.request("GET", "/api/info")[2])
    assert got["gate_plot"] is True and got["stages"] == ["align", "finetune"]
    status, headers, png = client.request("GET", "/api/gates.png")
    assert status == 200 and headers["Content-Type"] == "image/png" and png.startswith(b"\x89PNG")
    png_file = png_bytes((10, 10), "blue")
    (tmp_path / "gates.png").write_bytes(png_file)
    assert DemoApp(FakeVLM(), info).gate_png == png_file


def test_model_info_reads_run_info(tiny_demo_vlm):
    from pill.web import model_info

    info = model_info(tiny_demo_vlm)
    assert info["trained"] is False and info["vpg"] == tiny_demo_vlm.vpg.name
    tiny_demo_vlm.run_info = {"run_dir": "runs/x", "stages": [{"name": "align", "steps": 10}, "finetune"],
                              "llm": "smollm2", "vpg": "efficientnet-lite0"}
    try:
        info = model_info(tiny_demo_vlm)
    finally:
        del tiny_demo_vlm.run_info
    assert info["trained"] is True and info["run_dir"] == "runs/x" and info["llm"] == "smollm2"
    assert info["stages"] == ["align (steps 10)", "finetune"]


def test_serve_command_arguments():
    import argparse

    from pill.errors import PillError
    from pill.web.commands import load_demo_model, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve"])
    assert (args.run, args.host, args.port, args.max_upload_mb) == (None, "127.0.0.1", 7860, 10.0)
    args = parser.parse_args(["serve", "--run", "r", "--host", "0.0.0.0", "--port", "0", "--max-upload-mb", "2.5"])
    assert (args.run, args.host, args.port, args.max_upload_mb) == ("r", "0.0.0.0", 0, 2.5)
    assert parser.parse_args(["serve", "--max-input-mb", "probe=0.5"]).max_input_mb == [("probe", 0.5)]
    for bad in (["--port", "70000"], ["--max-upload-mb", "0"], ["--max-pixels", "-1"], ["--max-input-mb", "5"],
                ["--max-input-mb", "probe=0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", *bad])
    with pytest.raises(PillError, match="no such run directory"):
        load_demo_model("/nonexistent/run")


def _wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


# -- the page in headless Chromium ---------------------------------------------------------------
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def artifacts_dir() -> Path:
    path = Path(os.environ.get("PILL_ARTIFACTS") or Path(__file__).parent / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser():
    if os.environ.get("PILL_SKIP_BROWSER") == "1":
        if os.environ.get("CI"):
            pytest.fail("PILL_SKIP_BROWSER=1 is for developers only; CI must run the browser test", pytrace=False)
        pytest.skip("PILL_SKIP_BROWSER=1: browser test skipped on request (never set this in CI)")
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(missing)} not found: CI must run the browser test; run .ci/install-browser "
                        "(Debian chromium + chromium-driver) before the tests", pytrace=False)
        pytest.skip(f"{', '.join(missing)} not installed; to run the browser test: sudo bash .ci/install-browser")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[dev]'", pytrace=False)

    profile = tempfile.mkdtemp(prefix="pill-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,1000",
                 # a microphone for the Record button: allowed without asking, playing a test tone
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_browser_upload_ask_error_then_ask_again(browser, tiny_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    wait = WebDriverWait(d, 60)

    def by_id(element_id):
        return d.find_element(By.ID, element_id)

    def answers_done(n):
        turns = d.find_elements(By.CSS_SELECTOR, "#conversation .turn.assistant")
        return len(turns) == n and turns[-1].get_attribute("data-state") in ("done", "error")

    def ask(question):
        n = len(d.find_elements(By.CSS_SELECTOR, "#conversation .turn.assistant")) + 1
        by_id("question").clear()
        by_id("question").send_keys(question)
        by_id("ask").click()
        wait.until(lambda _: answers_done(n))
        last = d.find_elements(By.CSS_SELECTOR, "#conversation .turn.assistant")[-1]
        assert last.get_attribute("data-state") == "done", last.text
        assert last.find_element(By.CLASS_NAME, "text").text.strip()
        return last

    t0 = time.perf_counter()
    d.get(tiny_server.url)
    wait.until(lambda _: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    assert by_id("untrained-banner").is_displayed()
    assert "untrained" in by_id("model-badge").text
    assert len(d.find_elements(By.CSS_SELECTOR, "#param-table tbody tr")) >= 3
    assert len(d.find_elements(By.CSS_SELECTOR, "#examples button.example")) == 4
    by_id("max-new-tokens").clear()
    by_id("max-new-tokens").send_keys("12")

    # an image of our own, a question, a follow-up about the same image
    shape = tmp_path / "yellow-square.png"
    Image.new("RGB", (96, 96), "yellow").save(shape)
    by_id("file-input").send_keys(str(shape))
    wait.until(lambda _: "Image: yellow-square.png (96 × 96)" in by_id("status").text)
    assert by_id("preview").is_displayed() and by_id("image-caption").text == "yellow-square.png · 96 × 96"
    first_image = by_id("preview").get_attribute("data-image-id")
    ask("What colour is the square?")
    ask("Is it bigger than a coin?")
    assert len(d.find_elements(By.CSS_SELECTOR, "#conversation .turn.user")) == 2
    d.save_screenshot(str(artifacts_dir() / "web.png"))

    # a file that is not an image: a message on the page, the previous image stays, asking still works
    fake = tmp_path / "notes.png"
    fake.write_text("these are notes, not pixels")
    by_id("file-input").send_keys(str(fake))
    wait.until(lambda _: by_id("error").is_displayed())
    assert by_id("error").text == ("notes.png: not an image file (or an unsupported format). "
                                   "The previous image is still in use.")
    assert by_id("preview").get_attribute("data-image-id") == first_image
    d.save_screenshot(str(artifacts_dir() / "web-error.png"))
    ask("And now?")
    assert not by_id("error").is_displayed()

    # settings are checked on the page too
    by_id("max-new-tokens").clear()
    by_id("max-new-tokens").send_keys("100000")
    by_id("question").send_keys("too many tokens")
    by_id("ask").click()
    wait.until(lambda _: by_id("error").is_displayed())
    assert "Max new tokens must be" in by_id("error").text
    by_id("max-new-tokens").clear()
    by_id("max-new-tokens").send_keys("8")

    # a bundled example starts a new conversation with its suggested question
    d.find_element(By.CSS_SELECTOR, "#examples button[data-file='two-shapes.png']").click()
    wait.until(lambda _: by_id("preview").get_attribute("data-image-id") not in (None, first_image))
    assert not d.find_elements(By.CSS_SELECTOR, "#conversation .turn")
    assert by_id("question").get_attribute("value") == "What is to the left of the red square?"
    by_id("ask").click()
    wait.until(lambda _: answers_done(1))

    # clear empties the conversation and the image
    by_id("clear").click()
    assert not d.find_elements(By.CSS_SELECTOR, "#conversation .turn") and not by_id("preview").is_displayed()

    errors = [e["message"] for e in d.get_log("browser")
              if e["level"] == "SEVERE" and "status of 400" not in e["message"]]
    assert not errors, errors
    print(f"browser test: {time.perf_counter() - t0:.1f} s; screenshots in {artifacts_dir()}")


# -- under load and hostile input ---------------------------------------------------------------
def test_a_burst_of_connections_waits_in_the_listen_queue(fake_client):
    server = make_server(DemoApp(FakeVLM(), FAKE_INFO, Limits()), "127.0.0.1", 0)
    host, port = server.server_address[:2]
    socks, serving = [], None
    try:
        # 20 clients arrive before the server accepts any: every connection must wait in the backlog
        for _ in range(20):
            s = socket.socket()
            s.settimeout(0.5)  # a dropped SYN is retried after 1 s: a full backlog times out here
            s.connect((host, port))
            s.sendall(b"GET /api/info HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            socks.append(s)
        serving = serve_in_thread(server)
        for s in socks:
            s.settimeout(30)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
            assert reply.startswith(b"HTTP/1.0 200"), reply[:80]
    finally:
        for s in socks:
            s.close()
        if serving is not None:  # shutdown() waits for a serve_forever that has started
            server.shutdown()
        server.server_close()


def test_uploads_are_decoded_only_within_the_queue(fake_client, monkeypatch):
    import pill.data.images

    gate, lock = threading.Event(), threading.Lock()
    count = {"calls": 0, "active": 0, "max_active": 0}
    real = pill.data.images.load_image

    def slow_load(source, *args, **kwargs):
        with lock:
            count["calls"] += 1
            count["active"] += 1
            count["max_active"] = max(count["max_active"], count["active"])
        try:
            gate.wait(20)
            return real(source, *args, **kwargs)
        finally:
            with lock:
                count["active"] -= 1

    monkeypatch.setattr(pill.data.images, "load_image", slow_load)
    monkeypatch.setattr("pill.web.app.load_image", slow_load, raising=False)
    client = fake_client(FakeVLM(), max_waiting=2)
    data = png_bytes((64, 64))
    results = []
    threads = [threading.Thread(target=lambda: results.append(client.upload(data))) for _ in range(20)]
    for t in threads:
        t.start()
    _wait_for(lambda: len(results) >= 17, timeout=20)  # all but the admitted three are refused at once
    busy = [r for s, r in results if s == 503]
    assert len(busy) == 17 and all("busy" in r["error"] for r in busy)
    gate.set()
    for t in threads:
        t.join(30)
    assert sorted(s for s, _ in results) == [200] * 3 + [503] * 17
    assert count["calls"] == 3 and count["max_active"] == 1  # refused uploads were never decoded
    assert client.upload(data)[0] == 200  # and the queue is free again


def test_a_conversation_longer_than_the_context_is_cut_and_the_page_is_told(client, tiny_demo_vlm, monkeypatch):
    monkeypatch.setattr(tiny_demo_vlm.llm.config, "max_position_embeddings", 256)
    seen = []
    real_generate = tiny_demo_vlm.generate
    monkeypatch.setattr(tiny_demo_vlm, "generate", lambda **kw: seen.append(kw) or real_generate(**kw))
    info = json.loads(client.request("GET", "/api/info")[2])
    assert info["limits"]["context_tokens"] == 256
    words = " ".join(["word"] * 150)
    history = [{"role": r, "content": words} for r in ("user", "assistant") * 4]
    status, events = client.chat("And now?", None, history, {"max_new_tokens": 8})
    assert status == 200 and answer_of(events) is not None
    notices = [d["message"] for e, d in events if e == "notice"]
    assert len(notices) == 1 and "oldest" in notices[0] and "256 tokens" in notices[0]
    assert seen[-1]["input_ids"].shape[1] + 8 <= 256
    status, reply = client.chat(" ".join(["word"] * 390), None, settings={"max_new_tokens": 8})
    assert status == 400 and "context of 256 tokens" in reply["error"]


def test_deeply_nested_json_is_a_400(client):
    body = b"[" * 100_000 + b"]" * 100_000
    status, _, reply = client.request("POST", "/api/chat", body, {"Content-Type": "application/json"})
    assert status == 400 and "nested" in json.loads(reply)["error"]
    assert client.request("GET", "/api/info")[0] == 200


def test_posts_from_a_foreign_origin_are_refused(client):
    port = client.server.server_address[1]
    body = json.dumps({"question": "hi", "settings": {"max_new_tokens": 2}}).encode()
    headers = {"Content-Type": "application/json"}
    for origin in ("http://evil.example", f"http://evil.example:{port}", "null", f"http://127.0.0.1:{port + 1}"):
        status, _, reply = client.request("POST", "/api/chat", body, {**headers, "Origin": origin})
        assert status == 403 and "Origin" in json.loads(reply)["error"], origin
        status, _, reply = client.request("POST", "/api/image", png_bytes(), {"Content-Type": "image/png",
                                                                             "Origin": origin})
        assert status == 403, origin
    for extra in ({}, {"Origin": f"http://127.0.0.1:{port}"}):
        status, _, _ = client.request("POST", "/api/chat", body, {**headers, **extra})
        assert status == 200, extra
    # GET is not state-changing: a foreign Origin may read the page (the Host check still applies)
    assert client.request("GET", "/api/info", headers={"Origin": "http://evil.example"})[0] == 200


# -- every modality the model reads ---------------------------------------------------------------
@pytest.fixture(scope="module")
def probe_server():
    """A tiny model that reads images and the "probe" modality of tests/test_modalities.py, served."""
    import torch

    from test_modalities import ProbeEncoder, load_probe
    from pill.encoders.efficientnet import EfficientNetVPG
    from pill.modalities import Modality, next_free_id, register_modality, unregister_modality
    from pill.models import build_llm_from_config, load_tokenizer
    from pill.vlm import PillVLM

    register_modality(Modality("probe", next_free_id(), "<probe>", load_probe, noun="probe reading"))
    try:
        torch.manual_seed(0)
        vlm = PillVLM(build_llm_from_config("llama"), EfficientNetVPG(pretrained=False, pool=2), load_tokenizer(),
                      encoders={"probe": ProbeEncoder()})
        server = start(vlm, limits=Limits(max_upload_bytes=200_000, max_input_bytes={"probe": 1000}))
        yield server, vlm
        server.shutdown()
        server.server_close()
    finally:
        unregister_modality("probe")


def npy_bytes(values) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(values, dtype=np.float32))
    return buf.getvalue()


def test_a_probe_reading_and_an_image_in_one_request(probe_server, monkeypatch):
    import base64

    server, vlm = probe_server
    client = Client(server)
    info = json.loads(client.request("GET", "/api/info")[2])
    assert [m["name"] for m in info["modalities"]] == ["image", "probe"]  # image first
    assert info["modalities"][1]["max_upload_bytes"] == 1000 and info["modalities"][0]["accept"] == "image/*"
    seen = []
    real_generate = vlm.generate
    monkeypatch.setattr(vlm, "generate", lambda **kw: seen.append(kw) or real_generate(**kw))
    files = {"image": {"name": "red.png", "data": base64.b64encode(png_bytes((24, 24))).decode()},
             "probe": {"name": "p.npy", "data": base64.b64encode(npy_bytes(range(8))).decode()}}
    body = json.dumps({"question": "What do they show?", "files": files, "settings": {"max_new_tokens": 4}})
    status, headers, reply = client.request("POST", "/api/chat", body.encode(), {"Content-Type": "application/json"})
    events = parse_events(reply.decode())
    assert status == 200 and answer_of(events) is not None
    batch = seen[-1]
    assert batch["pixel_values"].shape[0] == 1 and batch["probe_values"].shape == (1, 8)
    probe_id = vlm.modalities["probe"].id
    assert int((batch["modality_ids"] == probe_id).sum()) == vlm.encoders["probe"].num_tokens

    # uploaded first, then named by id; each modality has its own route, loader and size limit
    status, _, up = client.request("POST", "/api/upload/probe", npy_bytes(range(8)),
                                   {"Content-Type": "application/octet-stream", "X-File-Name": "p.npy"})
    up = json.loads(up)
    assert status == 200 and up["modality"] == "probe" and up["input_id"]
    _, img = client.upload(png_bytes((16, 16)))
    payload = {"question": "And now?", "inputs": {"probe": up["input_id"], "image": img["input_id"]},
               "settings": {"max_new_tokens": 3}}
    status, _, reply = client.request("POST", "/api/chat", json.dumps(payload).encode(),
                                      {"Content-Type": "application/json"})
    assert status == 200 and answer_of(parse_events(reply.decode())) is not None
    assert "probe_values" in seen[-1] and "pixel_values" in seen[-1]

    status, _, reply = client.request("POST", "/api/upload/probe", npy_bytes(range(400)),
                                      {"Content-Type": "application/octet-stream"})
    assert status == 413 and "probe reading" in json.loads(reply)["error"]
    status, _, reply = client.request("POST", "/api/upload/probe", b"not numpy at all",
                                      {"Content-Type": "application/octet-stream", "X-File-Name": "bad.npy"})
    assert status == 400 and "bad.npy: not a probe reading" in json.loads(reply)["error"]
    bad = {"question": "hi", "files": {"probe": {"name": "x.npy", "data": "!!not base64!!"}}}
    status, _, reply = client.request("POST", "/api/chat", json.dumps(bad).encode(),
                                      {"Content-Type": "application/json"})
    assert status == 400 and "probe" in json.loads(reply)["error"] and "base64" in json.loads(reply)["error"]
    status, _, reply = client.request("POST", "/api/chat", json.dumps({"question": "hi <probe>"}).encode(),
                                      {"Content-Type": "application/json"})
    assert status == 400 and "<probe>" in json.loads(reply)["error"]


def test_a_modality_the_model_does_not_read_is_refused(client):
    status, _, reply = client.request("POST", "/api/upload/sound", b"xyz", {"Content-Type": "application/octet-stream"})
    assert status == 404 and "reads no sound" in json.loads(reply)["error"]
    payload = {"question": "hi", "inputs": {"sound": "abc"}}
    status, _, reply = client.request("POST", "/api/chat", json.dumps(payload).encode(),
                                      {"Content-Type": "application/json"})
    assert status == 400 and "reads no sound" in json.loads(reply)["error"]


def ask_in_browser(d, wait, question: str, max_new_tokens: int):
    """Type ``question`` on the page, ask, wait for the answer to end; returns its turn element."""
    from selenium.webdriver.common.by import By

    d.find_element(By.ID, "max-new-tokens").clear()
    d.find_element(By.ID, "max-new-tokens").send_keys(str(max_new_tokens))
    d.find_element(By.ID, "question").send_keys(question)
    d.find_element(By.ID, "ask").click()

    def done(_):
        turns = d.find_elements(By.CSS_SELECTOR, "#conversation .turn.assistant")
        return turns and turns[-1].get_attribute("data-state") in ("done", "error")

    wait.until(done)
    return d.find_elements(By.CSS_SELECTOR, "#conversation .turn.assistant")[-1]


def test_browser_offers_an_upload_per_modality(browser, probe_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, _ = probe_server
    d = browser
    wait = WebDriverWait(d, 60)
    d.get(server.url)
    wait.until(lambda _: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    choosers = d.find_elements(By.CSS_SELECTOR, "input[type=file]")
    assert [c.get_attribute("id") for c in choosers] == ["file-input", "file-input-probe"]  # image first
    reading = tmp_path / "reading.npy"
    reading.write_bytes(npy_bytes(range(8)))
    d.find_element(By.ID, "file-input-probe").send_keys(str(reading))
    wait.until(lambda _: "Probe reading: reading.npy" in d.find_element(By.ID, "status").text)
    image = tmp_path / "blue.png"
    Image.new("RGB", (20, 20), "blue").save(image)
    d.find_element(By.ID, "file-input").send_keys(str(image))
    wait.until(lambda _: "Image: blue.png (20 × 20)" in d.find_element(By.ID, "status").text)
    assert d.find_element(By.ID, "caption-probe").text == "reading.npy"
    last = ask_in_browser(d, wait, "What do they show?", max_new_tokens=4)
    assert last.get_attribute("data-state") == "done", last.text
    too_big = tmp_path / "big.npy"
    too_big.write_bytes(npy_bytes(range(400)))
    d.find_element(By.ID, "file-input-probe").send_keys(str(too_big))
    wait.until(lambda _: d.find_element(By.ID, "error").is_displayed())
    assert d.find_element(By.ID, "error").text.startswith("big.npy: the file is")
    assert "The previous probe reading is still in use." in d.find_element(By.ID, "error").text


def test_large_buffers_go_back_to_the_os_on_glibc():
    import platform

    from pill.web.server import return_large_buffers_to_the_os

    applied = return_large_buffers_to_the_os()
    assert applied is (platform.libc_ver()[0] == "glibc")
