"""``pill chat``: streamed answers about images on a tiny model, multi-turn history, the interactive loop."""
from __future__ import annotations

import argparse
import io

import pytest
import torch
from PIL import Image

from pill.eval.run_commands import UNTRAINED_NOTE, ChatSession, chat_session, interactive_chat


@pytest.fixture
def vlm(tiny_vlm):
    torch.manual_seed(1)
    for n, p in tiny_vlm.named_parameters():
        if "pill_" in n:
            torch.nn.init.normal_(p, std=0.05)
    return tiny_vlm.eval()


@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (220, 20, 20)).save(path)
    return path


def test_streamed_pieces_join_to_the_answer(vlm, image_path):
    pieces = []
    answer = chat_session(vlm, "What colour is the square?", [image_path], max_new_tokens=6, stream=pieces.append)
    assert answer and "".join(pieces) == answer
    assert len(vlm.tokenizer(answer, add_special_tokens=False)["input_ids"]) <= 8
    # greedy: the same answer without streaming, and from a PIL image instead of a path
    assert chat_session(vlm, "What colour is the square?", [Image.open(image_path)], max_new_tokens=6) == answer


def test_the_image_reaches_the_model(vlm, image_path, monkeypatch):
    seen = []
    real_generate = vlm.generate
    monkeypatch.setattr(vlm, "generate", lambda **kw: seen.append(kw) or real_generate(**kw))
    ChatSession(vlm, max_new_tokens=2).ask("Describe it.", [image_path])
    (batch,) = seen
    assert batch["pixel_values"].shape[0] == 1  # (N, 3, H, W)
    assert int(batch["modality_ids"].sum()) == vlm.processor.num_image_tokens


def test_multi_turn_keeps_history_and_images(vlm, image_path):
    session = ChatSession(vlm, max_new_tokens=4)
    first = session.ask("What is this?", [image_path])
    second = session.ask("And its colour?")  # earlier images stay in the conversation
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[0]["content"].startswith("<image>\n")
    assert session.messages[1]["content"] == first.strip() and session.messages[3]["content"] == second.strip()
    assert len(session.images) == 1
    session.clear()
    assert session.messages == [] and session.images == []


def test_sampling_is_reproducible_with_a_seed(vlm):
    a = chat_session(vlm, "Tell me a story.", max_new_tokens=6, temperature=1.0, seed=3)
    b = chat_session(vlm, "Tell me a story.", max_new_tokens=6, temperature=1.0, seed=3)
    assert a == b


def test_interactive_loop_with_scripted_stdin(vlm, image_path, tmp_path):
    script = io.StringIO("\n".join([
        f"/image {image_path}",
        "What is in the picture?",
        f"/image {tmp_path / 'missing.png'}",  # an error, reported, the loop goes on
        "And now?",
        "",
        "/clear",
        "Hello",
        "exit",
        "never read",
    ]) + "\n")
    out, err = io.StringIO(), io.StringIO()
    session = ChatSession(vlm, max_new_tokens=4)
    turns = interactive_chat(session, script, out, err)
    assert turns == 3
    assert out.getvalue().count("\n") == 3  # one line per answer, nothing else on stdout
    assert "missing.png" in err.getvalue() and "not found" in err.getvalue()
    assert "cleared" in err.getvalue()
    # after /clear only the last exchange remains, without images
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["Hello"]
    assert session.images == []
    assert "never read" not in err.getvalue() + out.getvalue()


def test_interactive_loop_ends_at_eof_and_attaches_initial_images(vlm, image_path):
    session = ChatSession(vlm, max_new_tokens=3)
    turns = interactive_chat(session, io.StringIO("Describe the image.\n"), io.StringIO(), io.StringIO(),
                             images=[Image.open(image_path)])
    assert turns == 1 and len(session.images) == 1
    assert session.messages[0]["content"].startswith("<image>\n")


def _parser():
    from pill.eval.run_commands import register

    parser = argparse.ArgumentParser(prog="pill")
    register(parser.add_subparsers(dest="command"))
    return parser


def test_chat_cli_rejects_a_missing_image_before_loading_a_model(tmp_path):
    from pill.errors import PillError

    args = _parser().parse_args(["chat", "--image", str(tmp_path / "nope.png"), "hi"])
    with pytest.raises(PillError, match="not found"):
        args.func(args)


@pytest.mark.embedded
def test_chat_cli_without_run_uses_the_embedded_model_and_says_it_is_untrained(image_path, capsys):
    from pill.cli import main

    assert main(["chat", "--image", str(image_path), "--max-new-tokens", "8", "--device", "cpu",
                 "What", "is", "this?"]) == 0
    captured = capsys.readouterr()
    assert UNTRAINED_NOTE in captured.err and "learned nothing yet" in captured.err
    assert captured.out.endswith("\n") and captured.out.strip()


def test_a_conversation_longer_than_the_context_drops_its_oldest_turns(vlm, image_path, monkeypatch):
    from pill.errors import PillError

    monkeypatch.setattr(vlm.llm.config, "max_position_embeddings", 256)
    seen, notices = [], []
    real_generate = vlm.generate
    monkeypatch.setattr(vlm, "generate", lambda **kw: seen.append(kw) or real_generate(**kw))
    session = ChatSession(vlm, max_new_tokens=8)
    assert session.context_length() == 256
    session.ask("What is this?", [image_path])
    words = " ".join(["word"] * 60)
    for i in range(4):
        session.messages += [{"role": "user", "content": f"{i}: {words}"}, {"role": "assistant", "content": words}]
    session.ask("And now?", notice=notices.append)
    prompt = seen[-1]["input_ids"].shape[1]
    assert prompt + 8 <= 256
    assert len(notices) == 1 and "256 tokens" in notices[0] and "oldest" in notices[0]
    # the first exchange (and the image it brought) went first
    assert session.images == [] and "pixel_values" not in seen[-1]
    assert session.messages[-2]["content"] == "And now?"
    with pytest.raises(PillError, match="context of 256 tokens"):
        ChatSession(vlm, max_new_tokens=8).ask(" ".join(["word"] * 400))
