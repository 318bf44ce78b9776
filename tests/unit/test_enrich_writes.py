"""Queued Redis writes of consecutive batches merge in order: the later batch wins."""

from __future__ import annotations

from router_worker.enrich import WriteBack


def test_merged_writes_keep_every_key_and_let_the_later_batch_win() -> None:
    first = WriteBack(pins={("t", "s1"): "gpt-4o-mini", ("t", "s2"): "o3"}, pin_ttl_s=60,
                      cache={"k1": b"a"}, cache_ttl_s=30, assignments=[("r1", "e", "A")])
    later = WriteBack(pins={("t", "s2"): "claude-sonnet-4"}, pin_ttl_s=90,
                      cache={"k2": b"b"}, cache_ttl_s=45, assignments=[("r2", "e", "B")])
    merged = first.merged(later)
    assert merged.pins == {("t", "s1"): "gpt-4o-mini", ("t", "s2"): "claude-sonnet-4"}
    assert merged.cache == {"k1": b"a", "k2": b"b"}
    assert merged.assignments == [("r1", "e", "A"), ("r2", "e", "B")]
    assert (merged.pin_ttl_s, merged.cache_ttl_s) == (90, 45)
    assert first.pins == {("t", "s1"): "gpt-4o-mini", ("t", "s2"): "o3"}  # inputs untouched


def test_an_empty_write_back_is_false() -> None:
    assert not WriteBack()
    assert WriteBack(cache={"k": b"v"})
