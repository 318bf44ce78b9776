"""The keyword/fuzzy tier: typo-tolerant phrase matching, the cascade's safety net."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from rapidfuzz import fuzz, process

from router_worker.classify.engine import Prediction
from router_worker.config import RoutingConfig, load_config
from router_worker.events import CATEGORIES, Tier
from router_worker.settings import Settings

# Matching cost grows with text length; intent is almost always stated early.
_MAX_CHARS = 1500
_FUZZY_CUTOFF = 85.0
_MIN_FUZZY_LEN = 5
_WORD = re.compile(r"[^\W\d_]{5,}")
# On ASCII text (most prompts) those letters are a-z after lower-casing, and a plain class
# matches several times faster than the Unicode category test; the results are identical.
_ASCII_WORD = re.compile(r"[a-z]{5,}")
# Matched against lower-cased text: case-insensitive matching costs twice as much. The lookahead
# skips positions that cannot start a cue cheaply (keep it in step with the first letters).
_COMPLEX_WORDS = re.compile(
    r"\b(?=[acdeimoprst])(step[- ]by[- ]step|in detail|detailed|comprehensive|compare|design|"
    r"architect\w*|prove|derive|analy[sz]e|trade-?offs?|optimi[sz]e|multi-?step|production|"
    r"scalab\w*|thorough|essay|report|plan)\b",
)
_STRUCTURE = re.compile(r"```|^\s*(?:\d+[.)]|[-*])\s", re.MULTILINE)
_LIST_START = re.compile(r"\s*(?:\d+[.)]|[-*])\s")
# Words seen before skip the fuzzy matcher: natural language reuses a small vocabulary, so after
# warm-up almost every word is a dictionary hit. Cleared when full, so memory stays bounded.
_FUZZY_MEMO_MAX = 200_000


def phrase_pattern(phrases: Sequence[str]) -> str:
    """One regex alternation for many phrases, factored into a trie of common prefixes.

    Python's `re` tries each branch of a flat alternation at every position; a trie makes the
    work per position proportional to the longest match instead (about 5x faster here).
    """
    trie: dict[str, Any] = {}
    for phrase in phrases:
        node = trie
        for char in phrase:
            node = node.setdefault(char, {})
        node[""] = {}  # end of a phrase

    def emit(node: dict[str, Any]) -> str:
        ends = "" in node
        branches = [re.escape(c) + emit(child) for c, child in sorted(node.items()) if c]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if ends:  # a phrase ends here and longer ones continue: prefer the longer (greedy)
            body = f"(?:{body})?"
        return body

    return emit(trie)


def estimate_complexity(text: str, lowered: str | None = None) -> tuple[str, float]:
    """Simple/complex from length and structural cues, with a rough confidence.

    `lowered` is `text[:_MAX_CHARS].lower()` when the caller has it already.
    """
    words = len(text.split())
    if lowered is None:
        lowered = text[:_MAX_CHARS].lower()
    cues = len(_COMPLEX_WORDS.findall(lowered))
    head = text[:4000]
    if "\n" in head or "`" in head:
        cues += len(_STRUCTURE.findall(head))
    elif _LIST_START.match(head):  # one line, no fences: only the start can be a list item
        cues += 1
    questions = text.count("?")
    score = words / 60 + 0.5 * cues + 0.25 * max(questions - 1, 0)
    if score >= 1.0:
        return "complex", min(0.5 + score / 4, 0.95)
    return "simple", min(0.5 + (1 - score) / 2, 0.95)


class KeywordEngine:
    """Phrase matching over per-category phrase lists from the routing config: exact phrases
    through one compiled regex, typos through fuzzy matching of the batch's distinct words."""

    name = "keyword"

    def __init__(
        self, phrases: Mapping[str, Sequence[str]], default_category: str = "chat"
    ) -> None:
        # phrase -> indexes of the categories that list it
        self._owner: dict[str, tuple[int, ...]] = {}
        for index, category in enumerate(CATEGORIES):
            for phrase in phrases.get(category, ()):
                self._owner[phrase.lower()] = (*self._owner.get(phrase.lower(), ()), index)
        ordered = sorted(self._owner, key=len, reverse=True)  # longest phrase wins the match
        self._exact = (
            re.compile(r"(?<!\w)(" + phrase_pattern(ordered) + r")(?!\w)")
            if ordered
            else None
        )
        # Typos are only plausible in longer single words ("kubernetse"); short ones collide.
        self._words = [p for p in ordered if " " not in p and len(p) >= _MIN_FUZZY_LEN]
        self._memo: dict[str, str | None] = {}  # word -> the phrase word it is a typo of
        self._default = default_category
        digest = hashlib.sha256("\n".join(sorted(self._owner)).encode()).hexdigest()[:8]
        self._version = f"keyword-{digest}"

    @property
    def version(self) -> str:
        """Hash of the phrase lists."""
        return self._version

    def classify(self, texts: list[str]) -> list[Prediction]:
        """Exact hits per text, plus one fuzzy pass over the new distinct words of the batch."""
        if not texts:
            return []
        clipped = [t[:_MAX_CHARS].lower() for t in texts]
        exact = [self._exact.findall(t) if self._exact else [] for t in clipped]
        words = [(_ASCII_WORD if t.isascii() else _WORD).findall(t) for t in clipped]
        fuzzy = self._fuzzy_words(words)
        return [
            self._predict(texts[i], clipped[i], exact[i], words[i], fuzzy)
            for i in range(len(texts))
        ]

    def _fuzzy_words(self, words: list[list[str]]) -> dict[str, str | None]:
        """Each distinct word of the batch -> the phrase word it is a near-miss of, or None."""
        memo = self._memo
        if not self._words:
            return memo
        fresh = {w for text_words in words for w in text_words if w not in memo}
        if not fresh:
            return memo
        if len(memo) + len(fresh) > _FUZZY_MEMO_MAX:
            memo.clear()
        vocab = sorted(fresh)
        memo.update(dict.fromkeys(vocab))
        sim = process.cdist(
            vocab,
            self._words,
            scorer=fuzz.ratio,
            score_cutoff=_FUZZY_CUTOFF,
            dtype=np.uint8,
            workers=1,
        )
        rows, cols = np.nonzero(sim)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            if vocab[r] not in self._owner:  # an exact phrase is counted as exact, not fuzzy
                memo[vocab[r]] = self._words[c]
        return memo

    def _predict(
        self, text: str, lowered: str, exact: list[str], words: list[str],
        fuzzy: dict[str, str | None],
    ) -> Prediction:
        n = len(CATEGORIES)
        exact_votes = [0] * n
        for phrase in exact:
            for index in self._owner[phrase]:
                exact_votes[index] += 1
        # Exact hits count double so a clean match beats a near-miss.
        total = [2 * v for v in exact_votes]
        for word in words:
            near = fuzzy.get(word)
            if near is not None:
                for index in self._owner[near]:
                    total[index] += 1
        mass = sum(total)
        if not mass:
            return self._fallback(text, lowered)
        best = max(range(n), key=total.__getitem__)  # first of equals, like argmax
        complexity, complexity_conf = estimate_complexity(text, lowered)
        return Prediction(
            category=CATEGORIES[best],
            complexity=complexity,
            confidence=min(0.4 + 0.6 * total[best] / mass, 0.95),
            scores={c: v / mass for c, v in zip(CATEGORIES, total, strict=True)},
            complexity_confidence=complexity_conf,
            tier=Tier.KEYWORD if exact_votes[best] > 0 else Tier.FUZZY,
        )

    def _fallback(self, text: str, lowered: str) -> Prediction:
        complexity, complexity_conf = estimate_complexity(text, lowered)
        uniform = 1.0 / len(CATEGORIES)
        return Prediction(
            category=self._default,
            complexity=complexity,
            confidence=uniform,
            scores=dict.fromkeys(CATEGORIES, uniform),
            complexity_confidence=complexity_conf,
            tier=Tier.DEFAULT,
        )


def keyword_engine_from_config(config: RoutingConfig) -> KeywordEngine:
    """The keyword tier configured by `config.keywords`."""
    return KeywordEngine(config.keywords, config.default_category)


def load_keyword_engine(settings: Settings) -> KeywordEngine:
    """The keyword tier for the routing config named in settings."""
    return keyword_engine_from_config(load_config(settings.config))
