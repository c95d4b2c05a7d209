"""ScienceQA prompt formats: exact strings for every input and output format."""
import pytest

from pill.data.prompts import (
    CHAT_TEMPLATES, INPUT_FORMATS, OUTPUT_FORMATS, build_input, build_target, choices_text, context_text,
    parse_format, resolve_template, scienceqa_messages,
)
from pill.errors import ConfigError

P = {"question": "Q?", "choices": ["x", "y"], "answer": 1, "hint": "H.", "lecture": "L1\nL2", "solution": "S."}
QCM = "Question: Q?\nContext: H.\nOptions: (A) x (B) y"

INPUTS = {
    "CQM": "Context: H.\nQuestion: Q?\nOptions: (A) x (B) y",
    "QCM": QCM,
    "QCML": QCM + "\nBECAUSE: L1\nL2",
    "QCME": QCM + "\nBECAUSE: S.",
    "QCMLE": QCM + "\nBECAUSE: L1\nL2 S.",
    "QCLM": "Question: Q?\nContext: H.\nBECAUSE: L1\nL2\nOptions: (A) x (B) y",
    "QCEM": "Question: Q?\nContext: H.\nBECAUSE: S.\nOptions: (A) x (B) y",
    "QCLEM": "Question: Q?\nContext: H.\nBECAUSE: L1\nL2 S.\nOptions: (A) x (B) y",
}
OUTPUTS = {
    "A": "The answer is B.",
    "AL": "The answer is B. BECAUSE: L1\nL2",
    "AE": "The answer is B. BECAUSE: S.",
    "ALE": "The answer is B. BECAUSE: L1\nL2 S.",
    "AEL": "The answer is B. BECAUSE: S. L1\nL2",
    "LA": "L1\nL2 The answer is B.",
    "EA": "S. The answer is B.",
    "LEA": "L1\nL2 S. The answer is B.",
    "ELA": "S. L1\nL2 The answer is B.",
}


def test_tables_cover_every_format():
    assert set(INPUTS) == set(INPUT_FORMATS) and set(OUTPUTS) == set(OUTPUT_FORMATS)


@pytest.mark.parametrize("fmt", INPUT_FORMATS)
def test_input_formats(fmt):
    assert build_input(P, fmt) == INPUTS[fmt]


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_output_formats(fmt):
    assert build_target(P, fmt) == OUTPUTS[fmt]


@pytest.mark.parametrize("inp", INPUT_FORMATS)
@pytest.mark.parametrize("out", OUTPUT_FORMATS)
def test_every_combination_as_messages(inp, out):
    m = scienceqa_messages(P, *parse_format(f"{inp}-{out}"), has_image=True)
    assert [x["role"] for x in m] == ["user", "assistant"]
    assert m[0]["content"] == "<image>\n" + INPUTS[inp]
    assert m[1]["content"] == OUTPUTS[out]


def test_no_image_no_placeholder_and_system_prompt():
    m = scienceqa_messages(P, "QCM", "A", system_prompt="Be brief.")
    assert m[0] == {"role": "system", "content": "Be brief."}
    assert "<image>" not in m[1]["content"] and m[1]["content"] == QCM


def test_context_hint_caption_or_na():
    assert context_text("", None) == "N/A"
    assert context_text("", "") == "N/A"
    assert context_text("Hint.", "") == "Hint."
    assert context_text("", "A map.") == "A map."
    assert context_text("Hint.", "A map.") == "Hint. A map."
    assert "Context: H. A cap." in build_input(P, "QCM", caption="A cap.")


def test_options_lettered_a_to_e():
    assert choices_text(["a", "b", "c", "d", "e"]) == "(A) a (B) b (C) c (D) d (E) e"
    with pytest.raises(ValueError):
        choices_text(list("abcdef"))


def test_answer_override_and_empty_explanations():
    q = {**P, "lecture": "", "solution": ""}
    assert build_target(q, "ALE", answer=0) == "The answer is A."  # no dangling BECAUSE:
    assert build_target(q, "LEA") == "The answer is B."
    assert build_input(q, "QCMLE") == QCM
    assert build_input({**P, "lecture": ""}, "QCLEM") == "Question: Q?\nContext: H.\nBECAUSE: S.\nOptions: (A) x (B) y"


def test_reference_conventions():
    # the official GPT-3 prompt writes newlines of lecture/solution as a literal \n ...
    assert build_target(P, "ALE", escape_newlines=True) == "The answer is B. BECAUSE: L1\\nL2 S."
    # ... and its AL/AE put the solution/lecture after the answer (swapped)
    assert build_target(P, "AL", reference_al_ae_swap=True) == "The answer is B. BECAUSE: S."
    assert build_target(P, "AE", reference_al_ae_swap=True) == "The answer is B. BECAUSE: L1\nL2"
    # double spaces collapse as in the reference
    assert build_input({**P, "question": "Two  spaces?"}, "QCM").startswith("Question: Two spaces?")


@pytest.mark.parametrize("bad", ["QCM", "QCM-", "QMC-A", "QCM-B", "qcm-a", "QCM-A-A", ""])
def test_unknown_format_lists_valid_ones(bad):
    with pytest.raises(ConfigError) as e:
        parse_format(bad)
    msg = str(e.value)
    assert all(f in msg for f in INPUT_FORMATS) and all(f in msg for f in OUTPUT_FORMATS)
    with pytest.raises(ValueError):  # ConfigError is a ValueError too
        parse_format(bad)


def test_unknown_single_formats():
    with pytest.raises(ConfigError, match="QCLEM"):
        build_input(P, "XYZ")
    with pytest.raises(ConfigError, match="ELA"):
        build_target(P, "Z")


def test_resolve_template():
    class Tok:
        chat_template = None

    assert resolve_template(Tok()) == CHAT_TEMPLATES["llama-2"]  # fallback for tokenizers without one
    Tok.chat_template = "{{ messages }}"
    assert resolve_template(Tok()) == "{{ messages }}"
    assert resolve_template(Tok(), "chatml") == CHAT_TEMPLATES["chatml"]
    assert resolve_template(Tok(), "{% for m in messages %}{% endfor %}").startswith("{%")
    with pytest.raises(ConfigError, match="llama-2"):
        resolve_template(Tok(), "vicuna")
