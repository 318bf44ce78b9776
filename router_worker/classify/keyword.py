"""The keyword/fuzzy tier: typo-tolerant phrase matching, the cascade's safety net."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence

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
_COMPLEX_WORDS = re.compile(
    r"\b(step[- ]by[- ]step|in detail|detailed|comprehensive|compare|design|architect\w*|prove|"
    r"derive|analy[sz]e|trade-?offs?|optimi[sz]e|multi-?step|production|scalab\w*|"
    r"thorough|essay|report|plan)\b",
    re.IGNORECASE,
)
_STRUCTURE = re.compile(r"```|^\s*(?:\d+[.)]|[-*])\s", re.MULTILINE)


def estimate_complexity(text: str) -> tuple[str, float]:
    """Simple/complex from length and structural cues, with a rough confidence."""
    words = len(text.split())
    cues = len(_COMPLEX_WORDS.findall(text[:_MAX_CHARS])) + len(_STRUCTURE.findall(text[:4000]))
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
        self._owner: dict[str, np.ndarray] = {}
        for index, category in enumerate(CATEGORIES):
            for phrase in phrases.get(category, ()):
                vector = self._owner.setdefault(phrase.lower(), np.zeros(len(CATEGORIES)))
                vector[index] = 1.0
        ordered = sorted(self._owner, key=len, reverse=True)  # longest phrase wins the match
        self._exact = (
            re.compile(r"(?<!\w)(" + "|".join(re.escape(p) for p in ordered) + r")(?!\w)")
            if ordered
            else None
        )
        # Typos are only plausible in longer single words ("kubernetse"); short ones collide.
        self._words = [p for p in ordered if " " not in p and len(p) >= _MIN_FUZZY_LEN]
        self._default = default_category
        digest = hashlib.sha256("\n".join(sorted(self._owner)).encode()).hexdigest()[:8]
        self._version = f"keyword-{digest}"

    @property
    def version(self) -> str:
        """Hash of the phrase lists."""
        return self._version

    def classify(self, texts: list[str]) -> list[Prediction]:
        """Exact hits per text, plus one fuzzy pass over the distinct words of the batch."""
        if not texts:
            return []
        clipped = [t[:_MAX_CHARS].lower() for t in texts]
        exact = [self._exact.findall(t) if self._exact else [] for t in clipped]
        fuzzy = self._fuzzy_words(clipped)
        return [self._predict(texts[i], exact[i], clipped[i], fuzzy) for i in range(len(texts))]

    def _fuzzy_words(self, clipped: list[str]) -> dict[str, str]:
        """Distinct words of the batch that are near-misses of a phrase word -> that phrase."""
        if not self._words:
            return {}
        vocab = sorted(
            {
                w
                for t in clipped
                for w in _WORD.findall(t)
                if len(w) >= _MIN_FUZZY_LEN and w not in self._owner
            }
        )
        if not vocab:
            return {}
        sim = process.cdist(
            vocab,
            self._words,
            scorer=fuzz.ratio,
            score_cutoff=_FUZZY_CUTOFF,
            dtype=np.uint8,
            workers=1,
        )
        rows, cols = np.nonzero(sim)
        return {vocab[r]: self._words[c] for r, c in zip(rows.tolist(), cols.tolist(), strict=True)}

    def _predict(
        self, text: str, exact: list[str], clipped: str, fuzzy: dict[str, str]
    ) -> Prediction:
        exact_votes = np.zeros(len(CATEGORIES))
        for phrase in exact:
            exact_votes += self._owner[phrase]
        fuzzy_votes = np.zeros(len(CATEGORIES))
        if fuzzy:
            for word in _WORD.findall(clipped):
                near = fuzzy.get(word)
                if near is not None:
                    fuzzy_votes += self._owner[near]
        # Exact hits count double so a clean match beats a near-miss.
        total = 2 * exact_votes + fuzzy_votes
        if not total.any():
            return self._fallback(text)
        best = int(total.argmax())
        probs = total / total.sum()
        complexity, complexity_conf = estimate_complexity(text)
        return Prediction(
            category=CATEGORIES[best],
            complexity=complexity,
            confidence=float(min(0.4 + 0.6 * probs[best], 0.95)),
            scores={c: float(p) for c, p in zip(CATEGORIES, probs, strict=True)},
            complexity_confidence=complexity_conf,
            tier=Tier.KEYWORD if exact_votes[best] > 0 else Tier.FUZZY,
        )

    def _fallback(self, text: str) -> Prediction:
        complexity, complexity_conf = estimate_complexity(text)
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
