"""The hand-over's phase timings (tapdisk/daemon/holdtime.py): carried from the predecessor to
the successor as JSON, continued there, and written as one log line."""

from __future__ import annotations

import json
import time

from tapdisk.daemon.holdtime import Phases


def test_the_successor_continues_the_predecessors_steps_on_the_same_clock() -> None:
    sent = Phases()
    sent.mark("quiesce")
    sent.mark("pause")
    taken = Phases.from_json(json.loads(json.dumps(sent.to_json())))
    time.sleep(0.02)
    taken.mark("state")
    assert list(taken.steps) == ["quiesce", "pause", "state"]
    assert taken.steps["state"] >= 20
    assert abs(taken.total_ms - sum(taken.steps.values())) < 1e-6
    assert str(taken).endswith(" ms") and str(taken).startswith("quiesce ")


def test_a_predecessor_that_sends_no_steps_starts_the_count_at_the_successor() -> None:
    taken = Phases.from_json(None)
    taken.mark("state")
    assert list(taken.steps) == ["state"] and taken.steps["state"] < 1000
