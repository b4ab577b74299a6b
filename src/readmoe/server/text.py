"""Turn a request's growing token ids into text deltas a client can print at once.

Why not decode each token alone: BPE tokens are pieces of UTF-8 and of words (a leading
space or an accent belongs to a token's bytes, and SentencePiece drops a leading space at
the start of a decoded piece), so each step decodes a short window that starts a token or
two back, before and after the new ids, and the difference is what grew (vLLM's
incremental detokeniser): constant work per token, where decoding the whole output every
step would cost O(n) per token on the server's event loop. Two things are held back until
they can no longer change: an incomplete multi-byte character (U+FFFD at the window's end)
and, with stop strings, the last ``longest stop - 1`` characters, which might be the start
of a stop string the engine will cut. At the end the engine's own final text (already cut
before a stop) settles the rest, so the deltas add up to exactly the non-streamed text.
"""

from __future__ import annotations

from collections.abc import Sequence


class IncrementalText:
    def __init__(self, tokenizer, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read]: the window's already-counted part
        self.text = ""  # complete characters decoded so far
        self.sent = 0  # characters handed out so far

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, new_ids: Sequence[int]) -> str:
        """The text that ``new_ids`` made safe to show."""
        self.ids.extend(new_ids)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        end = len(self.text) - self.hold
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent:end], end
        return delta

    def finish(self, final_text: str) -> str:
        """The rest of ``final_text`` (the engine's text of the finished request)."""
        delta, self.sent = final_text[self.sent:], max(self.sent, len(final_text))
        return delta
