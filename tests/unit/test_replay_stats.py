"""Replay's pure parts: the range's end, the counters, the report and the checkpoint."""

from __future__ import annotations

from pathlib import Path

from router_worker.agents.route import Outgoing
from router_worker.replay import Checkpoint, RangeReader, Recorded, ReplayRange, ReplayStats
from router_worker.settings import Settings


def _out(rid: str, model: str, category: str, cost: float, status: str = "completed") -> Outgoing:
    labels = ("classifier", model, category, "normal") if status == "completed" else ("internal",)
    return Outgoing("t", rid.encode(), b"{}", [], rid, status, "acme", labels, cost)


def test_range_ends_at_the_first_record_past_the_offset_or_time() -> None:
    by_offset = ReplayRange("t", to_offset=10)
    assert not by_offset.past_end(9, 0)
    assert by_offset.past_end(10, 0)
    by_time = ReplayRange("t", to_time_ms=1000)
    assert not by_time.past_end(99, 1000)
    assert by_time.past_end(0, 1001)


def test_stats_compare_candidate_with_recorded_decisions() -> None:
    stats = ReplayStats()
    recorded = {
        "a": Recorded("completed", "code", "gpt-4o", 0.010, "v1"),
        "b": Recorded("completed", "chat", "llama", 0.001, "v1"),
        "c": Recorded("failed", None, None, None, "v1"),
    }
    stats.tally([_out("a", "gpt-4o", "code", 0.010), _out("b", "gpt-4o", "code", 0.004),
                 _out("c", "llama", "chat", 0.001), _out("d", "llama", "chat", 0.001),
                 _out("e", "", "", 0.0, status="failed")], recorded)
    report = stats.report()
    assert report["requests_replayed"] == 5
    assert (report["completed"], report["failed"]) == (4, 1)
    assert report["joined_with_recorded"] == 3
    assert report["compared_decisions"] == 2
    assert report["agreement"] == {"category": 0.5, "model": 0.5, "status_changed": 1}
    assert report["confusion"] == {"chat": {"code": 1}, "code": {"code": 1}}
    assert report["decisions_changed"]["model"] == 1
    assert report["decisions_changed"]["top_model_transitions"] == {"llama->gpt-4o": 1}
    assert report["estimated_cost_usd"]["delta"] == 0.003


def test_checkpoint_round_trips_offsets_and_counters(tmp_path: Path) -> None:
    span = ReplayRange("t", from_offset=0, to_offset=100)
    reader = RangeReader(Settings(), span, start={0: 17, 3: 5}, done={2})
    stats = ReplayStats(replayed=22, compared=3, same_model=2)
    stats.confusion["code|chat"] = 1
    store = Checkpoint(tmp_path / "cp.json", span, "v2")
    store.save(reader, stats)
    offsets, done, loaded = store.load()
    assert offsets == {0: 17, 3: 5}
    assert done == {2}
    assert loaded.replayed == 22
    assert loaded.confusion == stats.confusion
    assert loaded.report() == stats.report()
