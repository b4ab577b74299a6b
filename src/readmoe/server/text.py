"""Turn a request's growing token ids into text deltas a client can print at once.

Why not decode each token alone: BPE tokens are pieces of UTF-8 and of words (a space or
an accent belongs to the next token's bytes), so text is decoded from all output ids and the
delta is what grew. Two things are held back until they can no longer change: a trailing
U+FFFD (an incomplete multi-byte character) and, with stop strings, the last
``longest stop - 1`` characters, which might be the start of a stop string the engine will
cut. At the end the engine's own final text (already cut before a stop) settles the rest,
so the deltas always add up to exactly the non-streamed text.
"""

from __future__ import annotations

from collections.abc import Sequence


class IncrementalText:
    def __init__(self, tokenizer, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0  # characters handed out so far

    def push(self, new_ids: Sequence[int]) -> str:
        """The text that ``new_ids`` made safe to show."""
        self.ids.extend(new_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        end = len(text) - self.hold
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        if end <= self.sent:
            return ""
        delta, self.sent = text[self.sent:end], end
        return delta

    def finish(self, final_text: str) -> str:
        """The rest of ``final_text`` (the engine's text of the finished request)."""
        delta, self.sent = final_text[self.sent:], max(self.sent, len(final_text))
        return delta
