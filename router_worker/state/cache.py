"""Decision cache: a repeated prompt reuses its classification; policy is re-applied."""

from __future__ import annotations

import hashlib
import unicodedata

from router_worker.classify.engine import Prediction
from router_worker.events import CATEGORIES, COMPLEXITIES, Tier

KEY_HEX_CHARS = 32


def normalise(text: str) -> str:
    """Case, Unicode form and whitespace do not change what a prompt asks for."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def cache_key(tenant_id: str, version: str, text: str) -> str:
    """sha256 of (tenant, config+classifier version, normalised prompt), truncated.

    The version is part of the key, so any config or classifier change invalidates every entry.
    """
    digest = hashlib.sha256(
        b"\x00".join((tenant_id.encode(), version.encode(), normalise(text).encode()))
    )
    return digest.hexdigest()[:KEY_HEX_CHARS]


def encode_prediction(prediction: Prediction) -> bytes:
    """What the cache stores: the classification, not the decision (health and budget change,
    so the policy runs again on every hit)."""
    return (f"{prediction.category}|{prediction.complexity}|{prediction.confidence:.4f}|"
            f"{prediction.complexity_confidence:.4f}").encode()


def decode_prediction(raw: bytes | None) -> Prediction | None:
    """A cached classification with `tier: cache`, or None for a miss or a foreign value."""
    if not raw:
        return None
    try:
        category, complexity, confidence, complexity_confidence = raw.decode().split("|")
        if category not in CATEGORIES or complexity not in COMPLEXITIES:
            return None
        return Prediction(category, complexity, float(confidence),
                          complexity_confidence=float(complexity_confidence), tier=Tier.CACHE)
    except (UnicodeDecodeError, ValueError):
        return None
