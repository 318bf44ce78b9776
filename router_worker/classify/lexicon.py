"""Multilingual intent concepts: words of many languages mapped onto shared concept columns.

The static embeddings come from an English encoder, so a request in Spanish or Korean shares
few features with the English prompts that make up most of the training data. A hand-written
lexicon (`lexicon_terms.CONCEPTS`) maps "poem", "poema", "Gedicht", "стихотворение" and "시를"
to one concept column, so what the head learns from one language carries over to the others.

Matching is per word and cached with the word (see `StaticEncoder.word_columns`), so it costs
nothing on the hot path for words seen before:
- in scripts written with spaces, a term is a stem: it matches a word that starts with it;
- in Chinese, Japanese and Thai, written without spaces, a term matches anywhere in a word;
- a term of several words (2 to 5; "pros and cons", "cómo estás") matches the same run of
  whole words: each word of a phrase has an id, and runs of ids are found with numpy in one
  pass over a batch (a regex over the text cost more than the rest of the engine).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from itertools import chain

import numpy as np
import numpy.typing as npt

# Punctuation around a word says nothing about its stem: "résumé:", «перевод», (kubectl).
_STRIP = "".join(
    (
        "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
        "«»“”„‘’‚‹›¿¡…–—·•",  # noqa: RUF001 - these quote marks are the point
        "、。，．！？：；（）【】「」『』〈〉《》〔〕・～",  # noqa: RUF001
    )
)
_UNSPACED = re.compile(r"[\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


I64 = npt.NDArray[np.int64]
MAX_PHRASE_WORDS = 5
PHRASE_MULT = np.uint64(0x9E3779B97F4A7C15)


def strip_word(word: str) -> str:
    """A lower-cased whitespace word without the punctuation around it."""
    return word.strip(_STRIP)


class Lexicon:
    """Concept ids (0..size-1) of a word, from stems and, for unspaced scripts, substrings."""

    def __init__(self, concepts: Mapping[str, Sequence[str]]) -> None:
        self.names: tuple[str, ...] = tuple(sorted(concepts))
        # Identifies what each concept column means: an artifact records it and is refused by a
        # worker whose lexicon differs, even where the number of concepts is the same.
        digest = hashlib.sha256()
        for name in self.names:
            digest.update("\x1e".join([name, *concepts[name]]).encode() + b"\x1f")
        self.digest = digest.hexdigest()
        self._stems: dict[str, frozenset[int]] = {}
        inside: dict[str, set[int]] = {}
        stems: dict[str, set[int]] = {}
        phrases: dict[tuple[str, ...], set[int]] = {}
        for index, name in enumerate(self.names):
            for term in concepts[name]:
                text = strip_word(term.lower().strip())
                words = tuple(filter(None, map(strip_word, text.split())))
                if not text:
                    continue
                if _UNSPACED.search(text):
                    inside.setdefault(text, set()).add(index)
                elif len(words) == 1:
                    stems.setdefault(words[0], set()).add(index)
                elif len(words) <= MAX_PHRASE_WORDS:
                    phrases.setdefault(words, set()).add(index)
        self._stems = {stem: frozenset(ids) for stem, ids in stems.items()}
        # First two characters (the character, for one-character stems) -> lengths of the stems
        # beginning with them: a word is looked up only at the lengths of stems it could start
        # with, not at every stem length (~20 lookups a word, where ids and numbers match none).
        heads: dict[str, set[int]] = {}
        for stem in stems:
            heads.setdefault(stem[:2], set()).add(len(stem))
        self._stem_lengths = {two: tuple(sorted(n)) for two, n in heads.items()}
        self._inside = {term: frozenset(ids) for term, ids in inside.items()}
        # First character -> lengths of the terms starting with it, longest first.
        starts: dict[str, set[int]] = {}
        for term in inside:
            starts.setdefault(term[0], set()).add(len(term))
        self._inside_lengths = {c: tuple(sorted(n, reverse=True)) for c, n in starts.items()}
        # Words of phrases get ids from 1; every other word is 0 and never part of a match.
        vocabulary = sorted({w for words in phrases for w in words})
        self._word_ids = {w: i for i, w in enumerate(vocabulary, start=1)}
        self._phrase_ids: dict[int, tuple[int, ...]] = {}
        for words, ids in phrases.items():
            key = int(_rolling(np.array([self._word_ids[w] for w in words], dtype=np.int64)))
            self._phrase_ids[key] = tuple(sorted(ids | set(self._phrase_ids.get(key, ()))))
        # One sorted array for phrases of every length: the rolling hash depends on the length.
        self._keys = np.unique(np.array(list(self._phrase_ids), dtype=np.uint64))

    @property
    def size(self) -> int:
        """Number of concept columns."""
        return len(self.names)

    def concepts(self, word: str) -> tuple[int, ...]:
        """Sorted concept ids matched by one lower-cased, punctuation-stripped word."""
        found: set[int] = set()
        stems = self._stems
        for head in (word[:1], word[:2]) if len(word) > 1 else (word,):
            for length in self._stem_lengths.get(head, ()):
                if length > len(word):
                    break
                ids = stems.get(word[:length])
                if ids:
                    found |= ids
        if self._inside and _UNSPACED.search(word):
            for term in self.inside_terms(word):
                found |= self._inside[term]
        return tuple(sorted(found))

    def inside_terms(self, word: str) -> list[str]:
        """Unspaced-script terms in a word, left to right, without overlaps; at each position
        the longest term wins over a term it starts with.

        The same terms a regex alternation of them, longest first, finds; a sentence of Chinese
        or Japanese is one "word" here (no spaces), and that regex cost 30-100 us on one, this
        loop a dictionary lookup or two per character.
        """
        found: list[str] = []
        lengths, terms = self._inside_lengths, self._inside
        i, n = 0, len(word)
        while i < n:
            for length in lengths.get(word[i], ()):
                if length <= n - i and word[i : i + length] in terms:
                    found.append(word[i : i + length])
                    i += length
                    break
            else:
                i += 1
        return found

    def word_id(self, word: str) -> int:
        """Id of a lower-cased, punctuation-stripped word among phrase words; 0 if in none."""
        return self._word_ids.get(word, 0)

    def phrase_table(self) -> tuple[npt.NDArray[np.uint64], I64, I64]:
        """The phrases as flat arrays, for the compiled head (_cpu_head.c): the sorted rolling
        hashes, and the concept ids of hash k at `concepts[starts[k]:starts[k + 1]]`."""
        found = [self._phrase_ids[int(key)] for key in self._keys]
        starts = np.cumsum([0, *map(len, found)], dtype=np.int64)
        concepts = np.fromiter(chain.from_iterable(found), dtype=np.int64, count=int(starts[-1]))
        return self._keys, starts, concepts

    def phrase_columns(self, word_ids: I64, owner: I64) -> tuple[I64, I64]:
        """Concept ids of every phrase found in a batch's words, with the text of each.

        `word_ids` are the batch's words in order (`word_id`), `owner` their texts (sorted).
        A run of n words is hashed by rolling over the ids, so all runs of one length are
        looked up at once; only the few hits are handled one by one.
        """
        ids = word_ids.astype(np.uint64)
        rolling = ids
        valid = word_ids > 0
        hashes: list[npt.NDArray[np.uint64]] = []
        starts: list[I64] = []
        for n in range(2, MAX_PHRASE_WORDS + 1):
            m = word_ids.shape[0] - n + 1
            if m <= 0:
                break
            last = slice(n - 1, n - 1 + m)
            rolling = rolling[:m] * PHRASE_MULT + ids[last]
            valid = valid[:m] & (word_ids[last] > 0) & (owner[last] == owner[:m])
            at = np.flatnonzero(valid)
            hashes.append(rolling[at])
            starts.append(at)
        cols: list[int] = []
        owners: list[int] = []
        if hashes and self._keys.shape[0]:
            candidates = np.concatenate(hashes)
            first = np.concatenate(starts)
            at = np.minimum(np.searchsorted(self._keys, candidates), self._keys.shape[0] - 1)
            for i in np.flatnonzero(self._keys[at] == candidates).tolist():
                found = self._phrase_ids[int(candidates[i])]
                cols.extend(found)
                owners.extend([int(owner[first[i]])] * len(found))
        if not cols:
            none = np.zeros(0, dtype=np.int64)
            return none, none
        col_arr, owner_arr = np.array(cols, dtype=np.int64), np.array(owners, dtype=np.int64)
        order = np.argsort(owner_arr, kind="stable")  # phrases of 2 words come before 3: re-sort
        return col_arr[order], owner_arr[order]


def _rolling(ids: I64) -> np.uint64:
    """The rolling hash of one run of word ids, as `phrase_columns` computes it."""
    value = ids[:1].astype(np.uint64)
    for i in range(1, ids.shape[0]):
        value = value * PHRASE_MULT + ids[i : i + 1].astype(np.uint64)
    return np.uint64(value[0])


def _default() -> Lexicon:
    from router_worker.classify.lexicon_terms import CONCEPTS

    return Lexicon(CONCEPTS)


LEXICON = _default()
