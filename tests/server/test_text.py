"""Incremental detokenisation: deltas add up to the final text, never show half a character
or the start of a stop string the engine will cut."""

from __future__ import annotations

from readmoe.server.text import IncrementalText


class BytePieces:
    """A tokenizer whose tokens are raw byte strings (as byte-level BPE tokens are)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_a_split_character_waits_for_its_last_byte():
    euro = "€".encode()  # 3 bytes, split over 2 tokens
    text = IncrementalText(BytePieces([b"a ", euro[:2], euro[2:], b"!"]))
    assert [text.push([i]) for i in range(4)] == ["a ", "", "€", "!"]
    assert text.finish("a €!") == ""


def test_stop_prefixes_are_held_back_until_the_end():
    text = IncrementalText(BytePieces([b"one", b" E", b"N", b"D"]), stops=["END", "x"])
    shown = [text.push([i]) for i in range(3)]
    assert shown == ["o", "ne", " "]  # the last 2 characters might begin "END"
    assert text.finish("one ") == ""  # the engine cut "END": nothing of it was shown


def test_deltas_add_up_to_the_final_text_without_stops():
    pieces = [b"The", b" court", b" held", b" that"]
    text = IncrementalText(BytePieces(pieces))
    streamed = "".join(text.push([i]) for i in range(len(pieces)))
    assert streamed + text.finish(b"".join(pieces).decode()) == "The court held that"
