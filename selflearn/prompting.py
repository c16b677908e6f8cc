"""How a conversation becomes token ids: one definition for serving and for training.

What the trainer teaches must be exactly what the chat shows the model at question time, or the
knowledge it learns sits behind a prompt nobody sends. So both render through these functions:

* a tokenizer with a chat template (SmolLM2, Llama, Qwen...) renders through the template, with
  its own default system prompt when the caller gives none;
* one without (OPT and other base models) gets a plain transcript, `User: ...` / `Assistant: ...`,
  and an answer ends where the next `\\nUser:` would begin.

`render_example` is the training side: the prompt's ids carry no loss (label -100), the answer's
ids, up to and including the end-of-turn token, do.
"""

from __future__ import annotations

from typing import Any, Sequence

IGNORE = -100  # the label of a token that carries no loss (PyTorch's cross-entropy default)
PLAIN_STOP = "\nUser:"


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _plain_transcript(messages: Sequence[dict[str, str]]) -> str:
    lines = []
    for m in messages:
        if m["role"] == "system":
            lines.append(m["content"].strip() + "\n")
        else:
            lines.append(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content'].strip()}")
    return "\n".join(lines) + "\nAssistant:"


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of `messages` followed by the start of the assistant's turn."""
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(_plain_transcript(messages), add_special_tokens=True)["input_ids"]


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The ids that end an assistant turn: the template's end-of-turn token, else EOS."""
    ids = []
    if has_chat_template(tokenizer):
        # Render a one-turn exchange and take the first special token after the answer.
        probe = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], tokenize=False)
        tail = probe[probe.rindex("y") + 1:]
        tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        ids = [i for i in tail_ids if i in special][:1]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def render_example(tokenizer: Any, messages: Sequence[dict[str, str]], answer: str) -> tuple[list[int], list[int]]:
    """-> (ids, labels) of a whole exchange; labels are IGNORE on the prompt, the ids on the answer.

    The prompt is rendered exactly as `render_prompt` renders it for the chat, and the answer is
    tokenised on its own after it, so the boundary between them is exact.
    """
    answer = answer.strip()
    if not answer:
        raise ValueError("an example needs a non-empty answer")
    prompt = render_prompt(tokenizer, messages)
    if has_chat_template(tokenizer):
        full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
        head = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        if not full.startswith(head):
            raise ValueError("the chat template does not render an answer after its generation prompt")
        completion = tokenizer(full[len(head):], add_special_tokens=False)["input_ids"]
        # Keep the answer through its end-of-turn token; what the template adds after it (a
        # newline) is not something the model is asked to say.
        stops = set(end_of_turn_ids(tokenizer))
        cut = next((i + 1 for i, t in enumerate(completion) if t in stops), len(completion))
        completion = completion[:cut]
    else:
        completion = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
        completion += tokenizer(PLAIN_STOP, add_special_tokens=False)["input_ids"]  # what stops a plain answer
    return prompt + completion, [IGNORE] * len(prompt) + list(completion)
