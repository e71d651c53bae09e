"""Turn conversations into token ids with labels on the assistant's tokens only.

The conversation is rendered once with the base tokenizer's chat template; each
assistant turn's span is found by rendering the conversation up to that turn (with
and without the generation prompt), so any template works without special markers.
The end-of-turn tokens after an answer are labelled too: the model learns to stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from adapterdeck.core.basemodel import render_chat
from adapterdeck.core.errors import AdapterdeckError
from adapterdeck.core.formats import Conversation

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, conv: Conversation
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of the assistant turns within it."""
    messages = conv.as_dicts()
    full = render_chat(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = render_chat(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        end = render_chat(tokenizer, messages[: i + 1])
        if full.startswith(start) and full.startswith(end) and len(end) > len(start):
            spans.append((len(start), len(end)))
    if not spans:
        # A template that renders earlier turns differently (some drop reasoning from past turns):
        # learn the final answer only, which every template renders as a suffix of the prompt.
        prompt = render_chat(tokenizer, messages[:-1], add_generation_prompt=True)
        if not full.startswith(prompt):
            raise AdapterdeckError(
                f"line {conv.line}: the chat template of {tokenizer.name_or_path!r} does not render the "
                "prompt as a prefix of the whole conversation; cannot tell the answer's tokens apart"
            )
        spans.append((len(prompt), len(full)))
    return full, spans


def encode(tokenizer: PreTrainedTokenizerBase, conv: Conversation) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` (IGNORE outside assistant turns) for one conversation."""
    if not getattr(tokenizer, "is_fast", False):
        raise AdapterdeckError(f"the tokenizer of {tokenizer.name_or_path!r} must be a fast tokenizer")
    text, spans = assistant_spans(tokenizer, conv)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [
        tok if any(s <= start < e for s, e in spans) else IGNORE
        for tok, (start, _end) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    if all(label == IGNORE for label in labels):
        raise AdapterdeckError(f"line {conv.line}: no assistant tokens to learn from")
    return {"input_ids": ids, "labels": labels}


def encode_prompt(tokenizer: PreTrainedTokenizerBase, conv: Conversation) -> list[int]:
    """The ids of everything before the final answer, ending with the generation prompt."""
    text = render_chat(tokenizer, conv.prompt, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class EncodedDataset:
    """A list of encoded examples the Trainer can index."""

    def __init__(self, rows: Sequence[dict[str, Any]]) -> None:
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]

    def tokens(self) -> int:
        return sum(len(r["input_ids"]) for r in self.rows)


def encode_all(tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Conversation]) -> EncodedDataset:
    return EncodedDataset([encode(tokenizer, c) for c in conversations])
