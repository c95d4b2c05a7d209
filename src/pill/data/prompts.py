"""ScienceQA prompts and targets in the official formats, and chat templates.

The strings follow ``models/base_prompt.py`` of lupantech/ScienceQA, which LLaVA and
LaVIN reuse. A format is ``<input>-<output>``, e.g. ``QCM-ALE``. Input letters:
Q question, C context (hint [+ caption], or ``N/A``), M options ``(A) x (B) y``,
L lecture, E explanation (the problem's ``solution``); L/E in the input appear after
``BECAUSE:``. Output letters: A the answer sentence ``The answer is B.``, then L/E in
the given order after ``BECAUSE:`` (``ALE``) or before the answer (``LEA``).

Where this module differs from the reference, on purpose:

- the prompt and the target are two chat turns (the reference writes one text with a
  trailing ``Answer:``); the user turn starts with ``<image>\\n`` when there is an image;
- lecture and solution keep real newlines (the reference GPT-3 prompt writes ``\\n``
  literally; ``escape_newlines=True`` restores that);
- an empty ``BECAUSE:`` section is left out in the input and the output alike;
- ``AL`` puts the lecture and ``AE`` the solution after the answer, as the letters say.
  The reference code swaps these two (its ``AL`` writes the solution);
  ``reference_al_ae_swap=True`` reproduces that.

``style="reference"`` (:data:`PROMPT_STYLES`) writes what the reference PILL code
(DsaltYfish/PILL, ``data/datasets_sqa.py``) trains and evaluates on instead: the template
:data:`REFERENCE_TEMPLATE` (``[INST]`` user ``[/INST]`` answer, no spaces, LLaMA-2's
``<<SYS>>`` block), the system message :data:`REFERENCE_SYSTEM_PROMPT`, the user turn
opening with ``Image:<image>.`` or ``Image:N/A.``, the AL/AE swap, and a dangling
``BECAUSE:`` when a problem has no lecture or solution to put after it. The one difference
left: the reference writes the text ``<image>`` in front of its 32 image slots; here
``<image>`` is the slot marker itself, so ``Image:`` is followed directly by the slots.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from ..errors import ConfigError
from . import IMAGE_TOKEN

PROMPT_STYLES = ("pill", "reference")
# data/datasets_sqa.py of the reference code; also its eval_sqa.py
REFERENCE_SYSTEM_PROMPT = ("You are a language vision assistant. Based on the image, question, context, and options, "
                           "please give an appropriate response, including your choice and reason.")
INPUT_FORMATS = ("CQM", "QCM", "QCML", "QCME", "QCMLE", "QCLM", "QCEM", "QCLEM")
OUTPUT_FORMATS = ("A", "AL", "AE", "ALE", "AEL", "LA", "EA", "LEA", "ELA")
OPTION_LETTERS = "ABCDE"  # ScienceQA has 2 to 5 options


def parse_format(fmt: str) -> tuple[str, str]:
    """``"QCM-ALE"`` -> ``("QCM", "ALE")``; a ConfigError lists the valid formats otherwise."""
    parts = fmt.split("-") if isinstance(fmt, str) else []
    if len(parts) != 2 or parts[0] not in INPUT_FORMATS or parts[1] not in OUTPUT_FORMATS:
        raise ConfigError(
            f"unknown prompt format {fmt!r}: expected <input>-<output> with input one of "
            f"{', '.join(INPUT_FORMATS)} and output one of {', '.join(OUTPUT_FORMATS)} (e.g. QCM-ALE)"
        )
    return parts[0], parts[1]


def check_input_format(name: str) -> str:
    if name not in INPUT_FORMATS:
        raise ConfigError(f"unknown input format {name!r}; valid: {', '.join(INPUT_FORMATS)}")
    return name


def check_output_format(name: str) -> str:
    if name not in OUTPUT_FORMATS:
        raise ConfigError(f"unknown output format {name!r}; valid: {', '.join(OUTPUT_FORMATS)}")
    return name


@dataclass(frozen=True)
class PromptOptions:
    """How a ScienceQA problem becomes a prompt and a target (checked on construction).

    Attributes:
        input_format, output_format: e.g. ``QCM`` and ``ALE``; :meth:`from_format` takes ``"QCM-ALE"``.
        use_caption: add the problem's caption (``captions.json``) to the context.
        system_prompt: a system message before the prompt (None: none, the template's default).
        escape_newlines, reference_al_ae_swap, keep_empty_because: the reference code's text
            quirks (module docstring).
        style: ``pill`` or ``reference`` (module docstring); :meth:`for_style` sets the fields
            that come with it.
    """

    input_format: str = "QCM"
    output_format: str = "A"
    use_caption: bool = False
    system_prompt: Optional[str] = None
    escape_newlines: bool = False
    reference_al_ae_swap: bool = False
    keep_empty_because: bool = False
    style: str = "pill"

    def __post_init__(self):
        check_input_format(self.input_format)
        check_output_format(self.output_format)
        check_style(self.style)

    def for_style(self, style: str) -> "PromptOptions":
        """These options in prompt style ``style``: ``reference`` also turns on the reference's
        text quirks and, where no system message is set, its system message."""
        from dataclasses import replace

        check_style(style)
        if style == "pill":
            return replace(self, style=style)
        system = self.system_prompt if self.system_prompt is not None else REFERENCE_SYSTEM_PROMPT
        return replace(self, style=style, system_prompt=system, reference_al_ae_swap=True, keep_empty_because=True)

    @classmethod
    def from_format(cls, prompt_format: str, **fields) -> "PromptOptions":
        """``PromptOptions.from_format("QCM-ALE", use_caption=True)``."""
        input_format, output_format = parse_format(prompt_format)
        return cls(input_format, output_format, **fields)

    @property
    def format(self) -> str:
        """``<input>-<output>``, e.g. ``QCM-ALE``."""
        return f"{self.input_format}-{self.output_format}"

    @property
    def text_options(self) -> dict[str, bool]:
        """The keyword arguments :func:`build_target` and :func:`scienceqa_messages` take."""
        return {"escape_newlines": self.escape_newlines, "reference_al_ae_swap": self.reference_al_ae_swap,
                "keep_empty_because": self.keep_empty_because}


def check_style(style: str) -> str:
    if style not in PROMPT_STYLES:
        raise ConfigError(f"unknown prompt style {style!r}; valid: {', '.join(PROMPT_STYLES)}")
    return style


def style_template(style: str) -> Optional[str]:
    """The chat template a prompt style renders with: None (the tokenizer's own) for ``pill``."""
    return "reference" if check_style(style) == "reference" else None


def context_text(hint: Optional[str], caption: Optional[str] = None) -> str:
    """Hint and caption joined by a space, or ``N/A`` when both are empty."""
    return " ".join([hint or "", caption or ""]).strip() or "N/A"


def choices_text(choices: Sequence[str]) -> str:
    """``(A) first (B) second ...``"""
    if len(choices) > len(OPTION_LETTERS):
        raise ValueError(f"{len(choices)} options, at most {len(OPTION_LETTERS)} are supported")
    return " ".join(f"({OPTION_LETTERS[i]}) {c}" for i, c in enumerate(choices))


def _clean(text: str) -> str:
    return text.replace("  ", " ").strip()  # the reference collapses double spaces the same way


def _explanation(problem: Mapping[str, Any], letters: str, escape_newlines: bool) -> str:
    parts = {"L": problem.get("lecture") or "", "E": problem.get("solution") or ""}
    if escape_newlines:
        parts = {k: v.replace("\n", "\\n") for k, v in parts.items()}
    return " ".join(parts[c] for c in letters if parts[c]).strip()


def build_input(problem: Mapping[str, Any], input_format: str = "QCM", *, caption: Optional[str] = None,
                escape_newlines: bool = False) -> str:
    """The question text of ``problem`` (keys question, choices, hint[, lecture, solution]).

    QCM -> ``Question: ...\\nContext: ...\\nOptions: (A) .. (B) ..``
    """
    check_input_format(input_format)
    q = f"Question: {problem['question']}"
    c = f"Context: {context_text(problem.get('hint'), caption)}"
    m = f"Options: {choices_text(problem['choices'])}"
    because = _explanation(problem, input_format[2:].replace("M", ""), escape_newlines)
    b = [f"BECAUSE: {because}"] if because else []
    if input_format == "CQM":
        lines = [c, q, m]
    elif input_format in ("QCLM", "QCEM", "QCLEM"):  # the explanation comes before the options
        lines = [q, c, *b, m]
    else:  # QCM, QCML, QCME, QCMLE
        lines = [q, c, m, *b]
    return _clean("\n".join(lines))


def build_target(problem: Mapping[str, Any], output_format: str = "A", *, answer: Optional[int] = None,
                 escape_newlines: bool = False, reference_al_ae_swap: bool = False,
                 keep_empty_because: bool = False) -> str:
    """The answer text: ``The answer is B.`` plus lecture/solution as ``output_format`` says.

    Args:
        answer: option index to state (default ``problem["answer"]``); the random-wrong-answer
            augmentation passes another one.
        keep_empty_because: when the format asks for a lecture or solution after the answer and
            the problem has none, end with ``BECAUSE:`` as the reference code does.
    """
    check_output_format(output_format)
    index = problem["answer"] if answer is None else answer
    sentence = f"The answer is {OPTION_LETTERS[index]}."
    letters = output_format.replace("A", "")
    if reference_al_ae_swap and output_format in ("AL", "AE"):
        letters = {"L": "E", "E": "L"}[letters]
    because = _explanation(problem, letters, escape_newlines)
    if not because:
        return f"{sentence} BECAUSE:" if keep_empty_because and letters and output_format.startswith("A") else sentence
    if output_format.startswith("A"):
        return _clean(f"{sentence} BECAUSE: {because}")
    return _clean(f"{because} {sentence}")


def scienceqa_messages(problem: Mapping[str, Any], input_format: str = "QCM", output_format: str = "A", *,
                       has_image: bool = False, caption: Optional[str] = None, answer: Optional[int] = None,
                       system_prompt: Optional[str] = None, style: str = "pill", placeholders: Sequence[str] = (),
                       **text_options) -> list[dict]:
    """Chat messages for one ScienceQA problem: [system], user (prompt), assistant (target).

    ``style``: ``pill`` puts the image placeholder on a line of its own before the question, after
    it one line per further input's placeholder (``placeholders``, e.g. ``["<audio>"]``);
    ``reference`` opens the user turn with ``Image:<image>.`` or ``Image:N/A.`` as the reference
    code does (the other reference settings come with :meth:`PromptOptions.for_style`)."""
    user = build_input(problem, input_format, caption=caption,
                       escape_newlines=text_options.get("escape_newlines", False))
    for p in reversed(placeholders):
        user = f"{p}\n{user}"
    if check_style(style) == "reference":
        user = f"Image:{IMAGE_TOKEN if has_image else 'N/A'}.\n{user}"
    elif has_image:
        user = f"{IMAGE_TOKEN}\n{user}"
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": build_target(problem, output_format, answer=answer,
                                                                    **text_options)})
    return messages


# -- chat templates -----------------------------------------------------------------------
# Used when a tokenizer has no chat template of its own, or when asked for by name.

LLAMA2_TEMPLATE = (
    # LLaMA-2 chat: <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s><s>[INST] ...
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- if loop.first and system -%}"
    "{{- bos_token + '[INST] <<SYS>>\\n' + system | trim + '\\n<</SYS>>\\n\\n' + m['content'] | trim + ' [/INST]' -}}"
    "{%- else -%}"
    "{{- bos_token + '[INST] ' + m['content'] | trim + ' [/INST]' -}}"
    "{%- endif -%}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{- ' ' + m['content'] | trim + ' ' + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

CHATML_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

PLAIN_TEMPLATE = (  # "ROLE: text" lines, with eos closing each answer
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + m['content'] + eos_token + '\\n' -}}"
    "{%- else -%}{{- m['role'] | upper + ': ' + m['content'] + '\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

REFERENCE_TEMPLATE = (
    # The reference PILL code's text (data/datasets_sqa.py, datasets_pretrain.py, datasets_llava_IT.py):
    # <s>[INST]<<SYS>>\n{system}\n<</SYS>>\n\n{user}[/INST]{answer}</s><s>[INST]{user}[/INST]{answer}</s>
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- if loop.first and system -%}"
    "{{- bos_token + '[INST]<<SYS>>\n' + system + '\n<</SYS>>\n\n' + m['content'] + '[/INST]' -}}"
    "{%- else -%}"
    "{{- bos_token + '[INST]' + m['content'] + '[/INST]' -}}"
    "{%- endif -%}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{- m['content'] + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

CHAT_TEMPLATES = {"llama-2": LLAMA2_TEMPLATE, "chatml": CHATML_TEMPLATE, "plain": PLAIN_TEMPLATE,
                  "reference": REFERENCE_TEMPLATE}
DEFAULT_FALLBACK_TEMPLATE = "llama-2"


def resolve_template(tokenizer, template: Optional[str] = None) -> str:
    """The Jinja chat template to use.

    ``template``: None (the tokenizer's own, else the LLaMA-2 layout), a name of
    ``CHAT_TEMPLATES``, or a Jinja template string.
    """
    if template is None:
        return getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATES[DEFAULT_FALLBACK_TEMPLATE]
    if template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[template]
    if "{{" in template or "{%" in template:
        return template
    raise ConfigError(f"unknown chat template {template!r}; valid names: {', '.join(CHAT_TEMPLATES)} "
                      "(or a Jinja template string)")


def render_chat(tokenizer, messages: Sequence[Mapping[str, str]], template: Optional[str] = None,
                add_generation_prompt: bool = False) -> str:
    """Render ``messages`` as text with the chat template (see :func:`resolve_template`)."""
    return tokenizer.apply_chat_template([dict(m) for m in messages],
                                         chat_template=resolve_template(tokenizer, template),
                                         tokenize=False, add_generation_prompt=add_generation_prompt)
