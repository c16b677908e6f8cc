"""Input/output safety filter: an interface and a deliberately simple default.

Replace the default with `safety_filter: "mypackage.module:make_filter"` in the app args; the
factory is called with the settings' `blocklist` and must return an object with
`check_input(text) -> Verdict` and `check_output(text) -> Verdict`.

The default refuses messages that contain blocklisted words or obvious prompt-injection markers
(chat-template control tokens a user should never type, "ignore previous instructions" and
friends), and stops an answer as soon as its text contains a blocklisted word. It is a seat belt,
not a moderation model.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Iterable, Protocol


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str = ""


ALLOW = Verdict(True)


class SafetyFilter(Protocol):
    def check_input(self, text: str) -> Verdict: ...
    def check_output(self, text: str) -> Verdict: ...


# Control tokens of common chat templates: typed by a user they would forge a system turn.
CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|begin_of_text|>", "<|start_header_id|>", "<|eot_id|>", "[INST]", "[/INST]", "<<SYS>>")
INJECTION_PATTERNS = (
    r"\bignore (all |any )?(the )?(previous|prior|above|earlier) (instructions|prompts?|rules)\b",
    r"\bdisregard (all |any )?(the )?(previous|prior|above|earlier) (instructions|prompts?|rules)\b",
    r"\bforget (all |any )?(your|the) (previous |prior )?(instructions|rules)\b",
    r"\b(reveal|print|show|repeat) (me )?(your|the) (system prompt|hidden instructions)\b",
)


class DefaultSafetyFilter:
    def __init__(self, blocklist: Iterable[str] = ()):
        words = [w.strip() for w in blocklist if w and w.strip()]
        self._block = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.I) if words else None
        self._injection = re.compile("|".join(INJECTION_PATTERNS), re.I)

    def check_input(self, text: str) -> Verdict:
        for tok in CONTROL_TOKENS:
            if tok.lower() in text.lower():
                return Verdict(False, f"the message contains the control sequence {tok!r}")
        if self._injection.search(text):
            return Verdict(False, "the message looks like a prompt-injection attempt")
        if self._block and (m := self._block.search(text)):
            return Verdict(False, f"the message contains the blocked term {m.group(0)!r}")
        return ALLOW

    def check_output(self, text: str) -> Verdict:
        if self._block and self._block.search(text):
            return Verdict(False, "the answer contained a blocked term")
        return ALLOW


def load_filter(path: str | None, blocklist: Iterable[str] = ()) -> SafetyFilter:
    """The default filter, or the one a `module:factory` import path builds."""
    if not path:
        return DefaultSafetyFilter(blocklist)
    module, _, attr = path.partition(":")
    factory = getattr(importlib.import_module(module), attr)
    flt = factory(list(blocklist))
    if not (hasattr(flt, "check_input") and hasattr(flt, "check_output")):
        raise ValueError(f"safety filter {path} must provide check_input and check_output")
    return flt
