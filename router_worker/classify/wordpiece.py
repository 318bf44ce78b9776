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

# Alphanumeric runs and single punctuation characters: BertPreTokenizer's split of a
# lower-cased, printable, whitespace-free ASCII word (every printable non-alnum is punctuation).
_PIECES = re.compile(r"[a-z0-9]+|[^a-z0-9]")


class AsciiWordPiece:
    """Greedy longest-match-first WordPiece over the tokenizer's own vocabulary."""

    def __init__(self, vocab: dict[str, int], unk_id: int, prefix: str, max_chars: int) -> None:
        self.vocab = vocab
        self.unk_id = unk_id
        self.prefix = prefix
        self.max_chars = max_chars
        # The longest entry beginning with each two characters, for word starts and for
        # continuations: a match at `start` is at most that long, so the longest-first search
        # begins there instead of at the end of the piece. Exact (any entry longer than one
        # character shares its first two with the text it matches); on ids and numbers, where
        # matches are short, it saves most of the lookups.
        self._head: dict[str, int] = {}
        self._tail: dict[str, int] = {}
        for token in vocab:
            table, text = (
                (self._tail, token[len(prefix):]) if prefix and token.startswith(prefix)
                else (self._head, token)
            )
            if text and len(text) > table.get(text[:2], 0):
                table[text[:2]] = len(text)

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
        """Ids of one word that `handles` accepts."""
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
            start, found, size, longest = 0, [], len(piece), self._head
            while start < size:
                end = min(size, start + max(longest.get(piece[start:start + 2], 0), 1))
                longest = self._tail
                while end > start:
                    sub = piece[start:end] if start == 0 else prefix + piece[start:end]
                    token = vocab.get(sub)
                    if token is not None:
                        found.append(token)
                        break
                    end -= 1
                else:  # no sub-word matched: the whole piece is unknown
                    found = [self.unk_id]
                    break
                start = end
            ids.extend(found)
        return ids


def handles(word: str) -> bool:
    """Plain printable lower-case ASCII without spaces: the words the fast path is exact on."""
    return word.isascii() and word.isprintable() and " " not in word and word == word.lower()
