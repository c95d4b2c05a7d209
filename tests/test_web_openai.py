"""The OpenAI-compatible endpoint of ``pill serve``, driven by the official ``openai`` client against a
real local server on a tiny random model."""
from __future__ import annotations

import base64
import io
import json
import urllib.request

import pytest
from PIL import Image

openai = pytest.importorskip("openai", reason="pip install -e '.[dev]' (the openai client)")

from pill.web import Limits, make_server, serve_in_thread  # noqa: E402


def data_url(size=(32, 32), colour="red", fmt="PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def vlm():
    import torch

    from pill.encoders.efficientnet import EfficientNetVPG
    from pill.models import build_llm_from_config, load_tokenizer
    from pill.vlm import PillVLM

    torch.manual_seed(0)
    return PillVLM(build_llm_from_config("llama"), EfficientNetVPG(pretrained=False, pool=2), load_tokenizer())


@pytest.fixture(scope="module")
def server(vlm):
    server = make_server(vlm, "127.0.0.1", 0, limits=Limits(max_upload_bytes=200_000, max_pixels=512 * 512),
                         api_key="sekrit")
    serve_in_thread(server)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "v1", api_key="sekrit", max_retries=0, timeout=120)


MODEL = "pill-default-untrained"


def test_models_lists_the_served_run(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_image_and_question_not_streamed(client, vlm, monkeypatch):
    seen = []
    real_generate = vlm.generate
    monkeypatch.setattr(vlm, "generate", lambda **kw: seen.append(kw) or real_generate(**kw))
    reply = client.chat.completions.create(model=MODEL, max_tokens=5, messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What colour is it?"},
                                     {"type": "image_url", "image_url": {"url": data_url()}}]}])
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == MODEL and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    assert seen[-1]["pixel_values"].shape[0] == 1
    assert reply.usage.prompt_tokens == seen[-1]["input_ids"].shape[1]
    assert 1 <= reply.usage.completion_tokens <= 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_answer_ends_with_done(client, server):
    stream = client.chat.completions.create(model=MODEL, max_tokens=6, stream=True, seed=3, temperature=0.8,
                                            top_p=0.9, stream_options={"include_usage": True}, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(fmt="JPEG")}},
                                     {"type": "text", "text": "Describe it."}]}])
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"]) and chunks[-1].usage.completion_tokens >= 1
    # the same request, not streamed and with the same seed, gives the same text
    again = client.chat.completions.create(model=MODEL, max_tokens=6, seed=3, temperature=0.8, top_p=0.9, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(fmt="JPEG")}},
                                     {"type": "text", "text": "Describe it."}]}])
    assert again.choices[0].message.content == text.strip()
    # on the wire: SSE data lines, the last one [DONE]
    body = json.dumps({"model": MODEL, "max_tokens": 2, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = urllib.request.Request(server.url + "v1/chat/completions", body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer sekrit"})
    with urllib.request.urlopen(req, timeout=60) as r:
        lines = [line for line in r.read().decode().split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_multi_turn_with_an_image_in_an_earlier_turn(client, vlm, monkeypatch):
    seen = []
    real_generate = vlm.generate
    monkeypatch.setattr(vlm, "generate", lambda **kw: seen.append(kw) or real_generate(**kw))
    reply = client.chat.completions.create(model=MODEL, max_tokens=4, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(colour="blue")}},
                                     {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A blue square."},
        {"role": "user", "content": "And its colour?"}])
    assert isinstance(reply.choices[0].message.content, str)
    assert seen[-1]["pixel_values"].shape[0] == 1  # the earlier image is still in the conversation


@pytest.mark.parametrize("content, status, code, words", [
    ([{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}], 400, "invalid_image_url",
     "does not fetch remote images"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"no png").decode()}}],
     400, "invalid_image", "not an image file"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}], 400, "invalid_image", "base64"),
    ([{"type": "image_url", "image_url": {"url": data_url(size=(600, 600))}}], 400, "invalid_image",
     "above the limit"),
])
def test_bad_images_get_openai_errors(client, content, status, code, words):
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "text", "text": "What is it?"}, *content]}])
    assert e.value.status_code == status
    err = e.value.body
    assert err["code"] == code and words in err["message"] and err["type"] == "invalid_request_error"
    assert err["param"].startswith("messages[0].content[1]")


def test_oversized_requests_and_out_of_range_settings(client):
    import os

    big = "data:image/png;base64," + base64.b64encode(os.urandom(400_000)).decode()
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url",
                                                                          "image_url": {"url": big}}]}])
    assert e.value.status_code == 413 and e.value.body["code"] == "image_too_large"
    huge = [{"type": "image_url", "image_url": {"url": big}}] * 8
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": huge}])
    assert e.value.status_code == 413
    for kwargs, param in (({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 100000}, "max_tokens"),
                          ({"temperature": 3}, "temperature"), ({"top_p": 1.5}, "top_p"), ({"seed": 1.5}, "seed"),
                          ({"n": 2}, "n")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], **kwargs)
        assert e.value.body["param"] == param, kwargs
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"


def test_a_wrong_or_missing_key_is_401(server):
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=server.url + "v1", api_key=key or "x", max_retries=0,
                            default_headers={} if key else {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.body["code"] == "invalid_api_key"
    # the page's own routes do not need the key
    with urllib.request.urlopen(server.url + "api/info", timeout=30) as r:
        assert r.status == 200
