"""Unit tests for timbre_common.text: sentence chunking across the supported languages."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from timbre_common.text import SUPPORTED_LANGUAGES, _sentence_spans, split_sentences

SAMPLES = {
    "en": "Dr. Smith arrived at 3.14 p.m. on Tuesday. Was he late? No! He was, as always, exactly on time; "
    "everyone else, however, had forgotten the meeting entirely.\nThe end.",
    "zh": "今天天气很好。我们去公园散步吧！你觉得怎么样？好的；我们走吧。",
    "ja": "今日はいい天気ですね。公園に行きましょう！どう思いますか？いいですね。",
    "ko": "오늘은 날씨가 좋네요. 공원에 갈까요? 좋아요! 같이 가요.",
    "es": "¿Dónde está la biblioteca? Está cerca de la plaza. ¡Qué bien! Gracias, Sra. López.",
    "fr": "Bonjour, je m'appelle Marie. Où est la gare ? Elle est là-bas ! Merci beaucoup.",
    "de": "Das ist z.B. ein Test. Am 3. Mai beginnt der Kurs. Wie geht's? Gut, danke!",
    "it": "Ciao, come stai? Sto bene, grazie. Andiamo al mare domani! Va bene.",
    "pt": "Olá, tudo bem? Estou ótimo, obrigado. Vamos à praia amanhã! Combinado.",
    "ru": "Привет, как дела? Всё хорошо, спасибо. Пойдём завтра на море! Договорились.",
}


def _non_space(text: str) -> str:
    return "".join(ch for ch in text if not ch.isspace())


def _assert_lossless(text: str, chunks: list[str]) -> None:
    assert _non_space("".join(c.strip() for c in chunks)) == _non_space(text)
    for chunk in chunks:
        assert chunk and chunk == chunk.strip()


def test_supported_languages() -> None:
    assert SUPPORTED_LANGUAGES == ("en", "zh", "ja", "ko", "es", "fr", "de", "it", "pt", "ru")
    assert set(SAMPLES) == set(SUPPORTED_LANGUAGES)


@pytest.mark.parametrize("lang", SUPPORTED_LANGUAGES)
@pytest.mark.parametrize("max_chars", [8, 20, 40, 300])
def test_every_language_is_chunked_losslessly_within_the_limit(lang: str, max_chars: int) -> None:
    text = SAMPLES[lang]
    chunks = split_sentences(text, max_chars=max_chars)
    _assert_lossless(text, chunks)
    longest_word = max(len(word) for word in text.split())
    assert all(len(chunk) <= max(max_chars, longest_word) for chunk in chunks)


@pytest.mark.parametrize("lang", [lang for lang in SUPPORTED_LANGUAGES if lang not in ("zh", "ja")])
def test_spaced_languages_are_never_cut_inside_a_word(lang: str) -> None:
    text = SAMPLES[lang]
    for max_chars in (5, 12, 30):
        assert " ".join(split_sentences(text, max_chars=max_chars)).split() == text.split()


def test_short_text_is_one_chunk() -> None:
    assert split_sentences("Hello there. How are you?") == ["Hello there. How are you?"]


def test_empty_and_blank_text_give_no_chunks() -> None:
    assert split_sentences("") == []
    assert split_sentences(" \n\t ") == []


def test_sentences_are_not_merged_past_the_limit() -> None:
    assert split_sentences("Hello there. How are you? Fine!", max_chars=20) == [
        "Hello there.",
        "How are you? Fine!",
    ]


def test_cjk_terminators_split_without_spaces() -> None:
    assert split_sentences("今天天气很好。我们去公园散步吧！你觉得怎么样？", max_chars=10) == [
        "今天天气很好。",
        "我们去公园散步吧！",
        "你觉得怎么样？",
    ]


def test_cjk_sentences_merge_without_a_space() -> None:
    assert split_sentences("好的。走吧。", max_chars=50) == ["好的。走吧。"]


def test_newlines_are_boundaries_and_whitespace_collapses() -> None:
    assert split_sentences("first line\nsecond   line", max_chars=12) == ["first line", "second line"]
    assert split_sentences("first line\n\nsecond line") == ["first line second line"]


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        ("Dr. Smith paid 3.50 dollars. He left.", ["Dr. Smith paid 3.50 dollars.", "He left."]),
        ("J. R. R. Tolkien wrote it. Really.", ["J. R. R. Tolkien wrote it.", "Really."]),
        ("Das ist z.B. ein Test. Wie geht es?", ["Das ist z.B. ein Test.", "Wie geht es?"]),
        ("It costs approx. ten euros. Ok.", ["It costs approx. ten euros.", "Ok."]),
        ("¿Dónde está? ¡Aquí!", ["¿Dónde está?", "¡Aquí!"]),
        ("他说：“走吧。”然后走了。", ["他说：“走吧。”", "然后走了。"]),
    ],
)
def test_sentence_boundaries_skip_abbreviations_decimals_and_initials(
    text: str, sentences: list[str]
) -> None:
    # Merging hides where sentences were cut, so this checks the private boundary finder directly.
    assert _sentence_spans(text) == sentences


def test_closing_quotes_stay_with_their_sentence() -> None:
    chunks = split_sentences('He said "stop." Then he left.', max_chars=16)
    assert chunks == ['He said "stop."', "Then he left."]


def test_long_sentence_splits_at_commas_first() -> None:
    text = "alpha beta gamma, delta epsilon zeta, eta theta iota, kappa lambda mu"
    chunks = split_sentences(text, max_chars=40)
    assert chunks == ["alpha beta gamma, delta epsilon zeta,", "eta theta iota, kappa lambda mu"]


def test_digit_grouping_comma_is_not_a_break() -> None:
    chunks = split_sentences("we counted 1,000,000 stars tonight", max_chars=18)
    assert "1,000,000" in " ".join(chunks).split()


def test_long_cjk_run_without_punctuation_splits_between_characters() -> None:
    text = "永" * 25
    chunks = split_sentences(text, max_chars=10)
    assert chunks == ["永" * 10, "永" * 10, "永" * 5]


def test_unbreakable_word_is_kept_whole() -> None:
    url = "https://example.com/" + "a" * 400
    assert split_sentences(f"See {url} now.", max_chars=50) == ["See", url, "now."]


def test_invalid_limit_is_rejected() -> None:
    with pytest.raises(ValueError):
        split_sentences("text", max_chars=0)


_ALPHABET = st.sampled_from(
    list("abcXYZ éüßñ жщ 한국 ,.!?;:'\"()\n\t　。！？；，、「」漢字かな…") + ["1,000", "3.14", "Dr.", "e.g."]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_ALPHABET, max_size=200).map("".join), st.integers(1, 60))
def test_chunking_never_loses_characters(text: str, max_chars: int) -> None:
    chunks = split_sentences(text, max_chars=max_chars)
    _assert_lossless(text, chunks)
    for chunk in chunks:
        # Only a single unbreakable token may exceed the limit.
        assert len(chunk) <= max_chars or not any(ch.isspace() for ch in chunk)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(["word", "longerword", "x", "a,", "b.", "c!", "d?", "é", "щ"]), max_size=80),
    st.lists(st.sampled_from([" ", "  ", "\n", " \t"]), min_size=80, max_size=80),
    st.integers(3, 40),
)
def test_spaced_words_survive_chunking_intact(words: list[str], gaps: list[str], max_chars: int) -> None:
    text = "".join(word + gap for word, gap in zip(words, gaps, strict=False))
    assert " ".join(split_sentences(text, max_chars=max_chars)).split() == text.split()


class _CountingText(str):
    """A text that counts the characters every slice of it copies."""

    copied = 0

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        piece = super().__getitem__(index)
        if isinstance(index, slice):
            type(self).copied += len(piece)
        return piece


def test_splitting_copies_the_text_a_bounded_number_of_times() -> None:
    # Work counted, not timed: the splitter once copied the rest of the text at every sentence end.
    text = _CountingText("Hi there. Mr. Smith went home! Did he? Yes.\n" * 2_000)
    _CountingText.copied = 0
    chunks = split_sentences(text, max_chars=300)
    assert "".join(chunks).replace(" ", "") == str(text).replace(" ", "").replace("\n", "")
    assert _CountingText.copied <= 3 * len(text)


@pytest.mark.timeout(120)
def test_millions_of_characters_split_in_linear_time() -> None:
    # One-character words with max_chars=1 make a piece of every word: a quadratic splitter (copying the rest of
    # the sentence at every cut) copies ~2*10^12 characters here and does not finish within the timeout.
    words = "a " * 1_500_000
    pieces = split_sentences(words, max_chars=1)
    assert len(pieces) == 1_500_000 and set(pieces) == {"a"}
    sentences = split_sentences("Ok. " * 250_000, max_chars=300)
    assert sum(c.count("Ok.") for c in sentences) == 250_000 and max(len(c) for c in sentences) <= 300
