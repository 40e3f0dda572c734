"""Text helpers for synthesis: the supported languages and sentence chunking of long input."""

from __future__ import annotations

__all__ = ["SUPPORTED_LANGUAGES", "split_sentences", "unstorable_characters"]

SUPPORTED_LANGUAGES: tuple[str, ...] = ("en", "zh", "ja", "ko", "es", "fr", "de", "it", "pt", "ru")

# Latin terminators end a sentence only before whitespace; CJK full-width ones end it anywhere.
_LATIN_TERMINATORS = frozenset(".!?;…")
_CJK_TERMINATORS = frozenset("。！？；｡．")
_CLOSERS = frozenset("\"'”’»」』）)]}›")
_SOFT_BREAKS = frozenset(",，、:：;")
# Lower-cased words (without the final dot) after which "." is not a sentence end.
_ABBREVIATIONS = frozenset(
    {
        "mr", "mrs", "ms", "dr", "prof", "sr", "sra", "srta", "jr", "st", "vs", "no", "nr", "e.g", "i.e",
        "z.b", "d.h", "u.a", "bzw", "ca", "dt", "mme", "mlle", "m", "sig", "dott", "p.ex", "p.ej", "ud",
        "uds", "т.е", "г", "гг", "им", "ул",
    }
)


def _is_cjk(ch: str) -> bool:
    """True for scripts written without spaces between words (Han, kana, full-width forms)."""
    code = ord(ch)
    return (
        0x3040 <= code <= 0x30FF  # hiragana, katakana
        or 0x3400 <= code <= 0x4DBF  # CJK extension A
        or 0x4E00 <= code <= 0x9FFF  # CJK unified ideographs
        or 0xF900 <= code <= 0xFAFF  # CJK compatibility ideographs
        or 0xFF00 <= code <= 0xFFEF  # half/full-width forms
        or 0x3000 <= code <= 0x303F  # CJK punctuation
        or 0x20000 <= code <= 0x2FFFF  # supplementary ideographs
    )


def _is_abbreviation(text: str, dot: int) -> bool:
    start = dot
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    word = text[start:dot].lstrip("\"'“‘«(¿¡[").lower()
    # A single letter before a dot is an initial ("J. R. R. Tolkien").
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def _sentence_spans(text: str) -> list[str]:
    """Cut text after sentence-ending punctuation and at line breaks."""
    sentences: list[str] = []
    start = 0
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\n" or ch == "\r":
            sentences.append(text[start:i])
            start = i + 1
            i += 1
            continue
        if ch in _CJK_TERMINATORS or ch in _LATIN_TERMINATORS:
            run_start = i
            cjk = False
            while i < n and (text[i] in _CJK_TERMINATORS or text[i] in _LATIN_TERMINATORS):
                cjk = cjk or text[i] in _CJK_TERMINATORS
                i += 1
            while i < n and text[i] in _CLOSERS:
                i += 1
            at_gap = i >= n or text[i].isspace()
            if cjk or at_gap:
                single_dot = text[run_start:i].rstrip("".join(_CLOSERS)) == "."
                # The next visible character, found by scanning (never by copying the rest of the text).
                j = i
                while j < n and text[j].isspace():
                    j += 1
                next_char = text[j] if j < n else ""
                # "3. mai", "etc. and": a lower-case continuation means the dot was not a full stop.
                continues = single_dot and next_char.islower()
                if not cjk and single_dot and (continues or _is_abbreviation(text, run_start)):
                    continue
                sentences.append(text[start:i])
                start = i
            continue
        i += 1
    sentences.append(text[start:])
    return [" ".join(s.split()) for s in sentences if s.strip()]


def _cut_point(text: str, start: int, max_chars: int) -> int:
    """Where to cut the over-long rest of a sentence (from `start`) so the head fits in max_chars without
    splitting a word; an index into `text`. Looks at a window of max_chars + 1 characters, never copies the rest."""
    sentence = text[start : start + max_chars + 1]
    window = sentence
    floor = max_chars // 3
    for i in range(min(len(window), max_chars) - 1, floor - 1, -1):
        # "1,000" is one word: a Latin comma is a break only when a space follows it.
        if window[i] in _SOFT_BREAKS and (_is_cjk(window[i]) or sentence[i + 1 : i + 2].isspace()):
            return start + i + 1
    for i in range(len(window) - 1, 0, -1):
        if window[i].isspace():
            return start + i
    for i in range(min(len(window), max_chars), 0, -1):
        # Between two ideographs there is no word to break.
        if _is_cjk(sentence[i - 1]) or _is_cjk(sentence[i]):
            return start + i
    # One unbreakable token (a URL, a long compound): keep it whole rather than cut inside it.
    i = start + max_chars
    while i < len(text) and not text[i].isspace():
        i += 1
    return i


def _split_long(sentence: str, max_chars: int) -> list[str]:
    pieces: list[str] = []
    start, n = 0, len(sentence)
    while n - start > max_chars:
        cut = _cut_point(sentence, start, max_chars)
        head = sentence[start:cut].strip()
        if head:
            pieces.append(head)
        start = cut
        while start < n and sentence[start].isspace():
            start += 1
    if start < n:
        pieces.append(sentence[start:])
    return pieces


def _joiner(left: str, right: str) -> str:
    return "" if _is_cjk(left[-1]) and _is_cjk(right[0]) else " "


def split_sentences(text: str, max_chars: int = 300) -> list[str]:
    """Split text into synthesis chunks of at most max_chars at sentence, then clause, then word boundaries.

    Short sentences are merged up to max_chars. A single word longer than max_chars is kept whole.
    Only whitespace is ever dropped (at chunk edges, and runs inside a chunk become one space).
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    pieces: list[str] = []
    for sentence in _sentence_spans(text):
        pieces.extend(_split_long(sentence, max_chars) if len(sentence) > max_chars else [sentence])

    chunks: list[str] = []
    for piece in pieces:
        if chunks:
            last = chunks[-1]
            joined = last + _joiner(last, piece) + piece
            if len(joined) <= max_chars:
                chunks[-1] = joined
                continue
        chunks.append(piece)
    return chunks


def unstorable_characters(value: str) -> str | None:
    """Why `value` cannot be stored as text (a NUL, a lone surrogate), or None when it can.

    PostgreSQL text refuses NUL, and a lone surrogate cannot be encoded as UTF-8 on the wire: both must be
    refused at the door with a clear error rather than fail deep inside.
    """
    if "\x00" in value:
        return "contains a NUL character"
    if any("\ud800" <= ch <= "\udfff" for ch in value):
        return "contains a lone UTF-16 surrogate"
    return None
