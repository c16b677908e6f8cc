"""Input/output safety filter: an interface and a deliberately simple default.

Replace the default with `safety_filter: "mypackage.module:make_filter"` in the app args; the
factory is called with the settings' `blocklist` and must return an object with
`check_input(text) -> Verdict` and `check_output(text) -> Verdict`.

The default refuses messages that contain blocklisted words or obvious prompt-injection markers
(chat-template control tokens a user should never type, "ignore previous instructions" and
friends), and stops an answer as soon as its text contains a blocklisted word. It matches on
`for_matching(text)`: Unicode compatibility forms folded (NFKC: full-width letters, ligatures),
invisible characters dropped (zero-width spaces and joiners, bidi controls, soft hyphens, tag
characters), common Cyrillic and Greek look-alikes of Latin letters folded, and every run of
whitespace, punctuation or underscores between two words read as one separator, so a double space,
a newline or "ignore_all" inside a phrase changes nothing. It is a seat belt, not a moderation
model: other spellings (l33t, words split by letters) still pass.
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol


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


# Characters that render as nothing: format characters (zero-width space, non-joiner and joiner,
# word joiner, bidi embeddings and isolates, BOM, soft hyphen, Mongolian vowel separator, tag
# characters), the combining grapheme joiner and the Hangul fillers.
_INVISIBLE = re.compile("[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f"
                        "\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff9-\ufffb"
                        "\U000e0000-\U000e007f]")
# Cyrillic and Greek letters drawn like Latin ones ("ignоre" with a Cyrillic o).
_LOOKALIKES = str.maketrans("аеорсухіјѕԁοαειкνυ" "ΑΒΕΖΗΙΚΜΝΟΡΤΥΧ" "АВЕКМНОРСТХ",
                            "aeopcyxijsdoaeikvu" "ABEZHIKMNOPTYX" "ABEKMHOPCTX")
# Between two words of a phrase: any run of whitespace, punctuation or underscores.
_GAP = r"[\W_]+"
_SPACES = re.compile(r"\s+")


def for_matching(text: str) -> str:
    """The text as the filter reads it (see the module docstring); never shown or stored."""
    text = _INVISIBLE.sub("", unicodedata.normalize("NFKC", text)).translate(_LOOKALIKES)
    return _SPACES.sub(" ", text)


def _phrase(words: str) -> str:
    """A blocklisted phrase as a pattern: its words in order, any gap between them."""
    return _GAP.join(re.escape(w) for w in for_matching(words).split())


class DefaultSafetyFilter:
    def __init__(self, blocklist: Iterable[str] = ()):
        words = [w for w in blocklist if w and w.strip()]
        self._block = re.compile(r"\b(" + "|".join(_phrase(w) for w in words) + r")\b", re.I) if words else None
        self._injection = re.compile("|".join(p.replace(" ", _GAP) for p in INJECTION_PATTERNS), re.I)

    def check_input(self, text: str) -> Verdict:
        seen = for_matching(text)
        folded = seen.casefold()
        for tok in CONTROL_TOKENS:
            if tok.casefold() in folded:
                return Verdict(False, f"the message contains the control sequence {tok!r}")
        if self._injection.search(seen):
            return Verdict(False, "the message looks like a prompt-injection attempt")
        if self._block and (m := self._block.search(seen)):
            return Verdict(False, f"the message contains the blocked term {m.group(0)!r}")
        return ALLOW

    def check_output(self, text: str) -> Verdict:
        if self._block and self._block.search(for_matching(text)):
            return Verdict(False, "the answer contained a blocked term")
        return ALLOW


def text_filter(blocklist: Iterable[str] = ()) -> Callable[[str], str | None]:
    """The default input filter as a function: why `text` is refused, or None (the trainer's check
    of stored feedback, the same rules /feedback applied when it took it in)."""
    flt = DefaultSafetyFilter(blocklist)

    def reason(text: str) -> str | None:
        verdict = flt.check_input(text)
        return None if verdict.allowed else verdict.reason

    return reason


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
