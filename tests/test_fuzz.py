"""A short run of the fuzz campaign (benchmarks/fuzz_cache.py; the 200-trial run and its figures
are in the README): damaged blocks, tails, cuts, record rows and databases never give a wrong
answer or an exception, heal after one save, and are flagged by verify."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import fuzz_cache  # noqa: E402


def test_a_short_fuzz_campaign_finds_nothing(llm, tmp_path):
    results = fuzz_cache.campaign(llm, tmp_path, trials=10, seed=7)
    s = fuzz_cache.summarize(results)
    assert s["trials"] == 10
    assert s["wrong_answers"] == 0
    assert s["exceptions_to_caller"] == 0
    assert s["agents_unhealed_after_one_save"] == 0
    assert s["verify_missed"] == []
    # the one thing a heal may leave is a damaged block only a shared cut held (no agent's own
    # restore reads it; the cut's next use drops it), and `verify --repair` clears that too
    assert s["verify_flags_after_heal_beyond_cuts"] == []
    assert s["verify_fails_after_repair"] == 0
    assert s["turn_sources"].get("disk", 0) > 0  # undamaged agents were restored, not prefilled
