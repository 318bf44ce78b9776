"""WordPiece for plain ASCII words in Python, identical to the BERT tokenizer's output.

The Rust tokenizer costs ~8-17 µs a word through its Python binding (normalisation with
alignment tracking, an Encoding object per call), which is more than the whole engine spends
on a cached prompt. Every prompt brings a few words the engine has never seen (ids, numbers,
names), so the engine tokenises plain lower-case ASCII words here (dict lookups, a few µs)
and leaves everything else (accents, CJK, control characters) to the tokenizer. The fast path
is only enabled for a BERT pipeline (BertNormalizer lower-casing, BertPreTokenizer, WordPiece),
where on ASCII normalisation is lower-casing and pre-tokenisation splits off each punctuation
character; tests compare it with the tokenizer on the corpus and on random ASCII.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

try:  # built from _cpu_head.c where the install found a C compiler (see setup.py)
    from router_worker.classify import _cpu_head as _native
except ImportError:  # pragma: no cover - exercised only on installs without a compiler
    _native = None  # type: ignore[assignment]

# Alphanumeric runs and single punctuation characters: BertPreTokenizer's split of a
# lower-cased, printable, whitespace-free ASCII word (every printable non-alnum is punctuation).
_PIECES = re.compile(r"[a-z0-9]+|[^a-z0-9]")
_ONE = (1,)  # the lengths to try where no longer entry begins with the next two characters


class AsciiWordPiece:
    """Greedy longest-match-first WordPiece over the tokenizer's own vocabulary."""

    def __init__(self, vocab: dict[str, int], unk_id: int, prefix: str, max_chars: int) -> None:
        self.vocab = vocab
        self.unk_id = unk_id
        self.prefix = prefix
        self.max_chars = max_chars
        # The lengths of the entries beginning with each two characters, longest first, for word
        # starts and for continuations: only those lengths can match at a position whose text
        # begins with those two characters, so the longest-first search tries them and then a
        # single character instead of every length down from the longest. Exact (an entry
        # longer than one character shares its first two with the text it matches); on ids,
        # hashes and numbers, where most lengths have no entry, it saves most of the lookups.
        head: dict[str, set[int]] = {}
        tail: dict[str, set[int]] = {}
        for token in vocab:
            table, text = (
                (tail, token[len(prefix):]) if prefix and token.startswith(prefix)
                else (head, token)
            )
            if len(text) > 1:
                table.setdefault(text[:2], set()).add(len(text))
        self._head = {two: (*sorted(sizes, reverse=True), 1) for two, sizes in head.items()}
        self._tail = {two: (*sorted(sizes, reverse=True), 1) for two, sizes in tail.items()}
        # The same search compiled (_cpu_head.c): ~10x faster on a new id or hash.
        self._compiled = (
            None if _native is None else _native.load_wordpiece(vocab, prefix, unk_id, max_chars)
        )

    @property
    def compiled(self) -> bool:
        """Whether `tokenize_many` runs the compiled search."""
        return self._compiled is not None

    def tokenize_many(self, words: list[str]) -> list[list[int] | None]:
        """Ids of each word; None for a word `handles` refuses (left to the tokenizer)."""
        if self._compiled is not None:
            return _native.wordpieces(self._compiled, words)
        return [self.tokenize(w) if handles(w) else None for w in words]

    @classmethod
    def from_tokenizer_json(cls, path: Path) -> AsciiWordPiece | None:
        """The fast path for a BERT-style tokenizer.json, else None (use the tokenizer)."""
        spec: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        model, normalizer = spec.get("model") or {}, spec.get("normalizer") or {}
        pre = spec.get("pre_tokenizer") or {}
        if (
            model.get("type") != "WordPiece"
            or normalizer.get("type") != "BertNormalizer"
            or not normalizer.get("lowercase")
            or pre.get("type") != "BertPreTokenizer"
        ):
            return None
        vocab: dict[str, int] = model["vocab"]
        unk = vocab.get(model.get("unk_token", "[UNK]"))
        if unk is None:
            return None
        # Added tokens ([PAD], [UNK], ...) are matched before normalisation; none is plain
        # lower-case text without brackets, but refuse the fast path if one ever is.
        for token in spec.get("added_tokens") or ():
            if handles(str(token.get("content", ""))):
                return None
        return cls(vocab, unk, str(model.get("continuing_subword_prefix", "##")),
                   int(model.get("max_input_chars_per_word", 100)))

    def tokenize(self, word: str) -> list[int]:
        """Ids of one word that `handles` accepts (the reference of the compiled search)."""
        ids: list[int] = []
        vocab, prefix = self.vocab, self.prefix
        for piece in _PIECES.findall(word):
            if len(piece) > self.max_chars:  # unknown even if it were an entry, as in BERT
                ids.append(self.unk_id)
                continue
            whole = vocab.get(piece)  # most words are one entry
            if whole is not None:
                ids.append(whole)
                continue
            start, found, size, lengths = 0, [], len(piece), self._head
            while start < size:
                left = size - start
                for length in lengths.get(piece[start:start + 2], _ONE):
                    if length > left:
                        continue
                    end = start + length
                    sub = piece[start:end] if start == 0 else prefix + piece[start:end]
                    token = vocab.get(sub)
                    if token is not None:
                        found.append(token)
                        break
                else:  # no sub-word matched: the whole piece is unknown
                    found = [self.unk_id]
                    break
                start, lengths = end, self._tail
            ids.extend(found)
        return ids


def handles(word: str) -> bool:
    """Plain printable lower-case ASCII without spaces: the words the fast path is exact on."""
    return word.isascii() and word.isprintable() and " " not in word and word == word.lower()
