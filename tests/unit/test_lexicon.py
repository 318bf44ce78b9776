"""The multilingual concept lexicon: stems, unspaced-script substrings and word phrases."""

from __future__ import annotations

import numpy as np

from router_worker.classify.lexicon import LEXICON, Lexicon, strip_word

TERMS = {
    "creative_poem": ("poem", "poema", "стих", "一首诗", "詩を"),
    "summarize_translate": ("translate", "traduc", "翻译", "in english"),
    "chat_greeting": ("how are you", "cómo estás"),
}
LEX = Lexicon(TERMS)
POEM, GREETING, TRANSLATE = (
    LEX.names.index(n) for n in ("creative_poem", "chat_greeting", "summarize_translate")
)


def _phrases(texts: list[str]) -> list[tuple[int, int]]:
    words = [w for t in texts for w in t.lower().split()]
    owner = np.repeat(np.arange(len(texts)), [len(t.split()) for t in texts])
    ids = np.array([LEX.word_id(strip_word(w)) for w in words], dtype=np.int64)
    cols, owners = LEX.phrase_columns(ids, owner)
    return list(zip(owners.tolist(), cols.tolist(), strict=True))


def test_a_stem_matches_every_word_that_starts_with_it() -> None:
    assert LEX.concepts("poemas") == (POEM,)
    assert LEX.concepts("стихотворение") == (POEM,)
    assert LEX.concepts("traducción") == (TRANSLATE,)
    assert LEX.concepts("apoema") == ()


def test_stems_of_every_length_match_including_one_character_and_nested_ones() -> None:
    lex = Lexicon({"a": ("시", "po", "poe", "poetry"), "b": ("poem",), "c": ("p",)})
    a, b, c = (lex.names.index(n) for n in ("a", "b", "c"))
    assert lex.concepts("시를") == (a,)
    assert lex.concepts("시") == (a,)
    assert lex.concepts("poetry") == (a, c)
    assert lex.concepts("poems") == (a, b, c)
    assert lex.concepts("p") == (c,)
    assert lex.concepts("pa") == (c,)
    assert lex.concepts("") == ()
    assert lex.concepts("x7f3a9") == ()


def test_unspaced_scripts_match_terms_anywhere_in_a_word() -> None:
    assert LEX.concepts("请把这段话翻译成英文") == (TRANSLATE,)
    assert LEX.concepts("秋の詩を書いて") == (POEM,)
    assert LEX.concepts("你好") == ()


def test_punctuation_around_a_word_is_ignored() -> None:
    assert strip_word("«poema»,") == "poema"
    assert strip_word("(translate:") == "translate"


def test_phrases_match_whole_word_runs_and_never_cross_texts() -> None:
    assert _phrases(["hi, how are you?"]) == [(0, GREETING)]
    assert _phrases(["hola, ¿cómo estás?", "say it in English"]) == [(0, GREETING), (1, TRANSLATE)]
    # "how are" ends one text and "you" starts the next: no phrase.
    assert _phrases(["tell me how are", "you doing"]) == []
    assert _phrases(["how were you"]) == []


def test_phrase_hits_come_back_sorted_by_text() -> None:
    hits = _phrases(["in english please", "how are you", "cómo estás amigo, in english"])
    assert [owner for owner, _ in hits] == sorted(owner for owner, _ in hits)
    assert set(hits) == {(0, TRANSLATE), (1, GREETING), (2, GREETING), (2, TRANSLATE)}


def test_the_shipped_lexicon_covers_every_category_in_many_languages() -> None:
    prefixes = {name.split("_", 1)[0] for name in LEXICON.names}
    assert prefixes == {
        "code",
        "math",
        "reasoning",
        "research",
        "creative",
        "chat",
        "summarize",
        "ops",
    }
    assert LEXICON.concepts("übersetzen") or LEXICON.concepts("übersetzung")
    assert LEXICON.concepts("요약해")


def test_unspaced_terms_are_those_a_longest_first_alternation_finds() -> None:
    """`inside_terms` finds what a regex alternation of the terms, longest first, finds."""
    import random
    import re

    terms = sorted(LEX._inside, key=len, reverse=True)
    alternation = re.compile("|".join(map(re.escape, terms)))
    rng = random.Random(5)
    filler = "的是了我你他们一二三四的。、日本語ですかนะครับ"
    for _ in range(3000):
        parts = [rng.choice(terms) if rng.random() < 0.5 else rng.choice(filler)
                 for _ in range(rng.randrange(1, 12))]
        text = "".join(parts)
        assert LEX.inside_terms(text) == alternation.findall(text), text
