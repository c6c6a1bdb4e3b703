"""The update lifecycle table (data) and the machine that applies it."""

from __future__ import annotations

import pytest

from agent.updater import IN_FLIGHT, STATES, TRANSITIONS, TransitionError, UpdateMachine

HAPPY = ["checking", "verifying", "unpacking", "converting", "staged", "activating", "active"]


def test_table_is_closed_and_complete() -> None:
    assert set(TRANSITIONS) == set(STATES)
    for src, dsts in TRANSITIONS.items():
        assert dsts <= set(STATES), src
    # every in-flight state can fail, and failure is reachable from nowhere else silently
    for st in IN_FLIGHT:
        assert "failed" in TRANSITIONS[st] or st == "checking"
    # every state is reachable from idle
    seen, todo = {"idle"}, ["idle"]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(STATES)


def test_happy_path_and_observer() -> None:
    seen: list[tuple[str, str]] = []
    m = UpdateMachine("det", on_change=lambda mach, old: seen.append((old, mach.state)))
    m.advance("checking", target="2")
    assert m.target == "2"
    for st in HAPPY[1:]:
        m.advance(st)
    assert m.state == "active" and m.target is None
    assert [b for _a, b in seen] == HAPPY
    m.advance("checking")
    m.advance("verifying")
    m.advance("failed", error="[signature] bad")
    assert m.to_dict()["error"] == "[signature] bad"
    m.advance("checking")


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        (["checking"], "active_then_staged"),
        (["checking", "verifying"], "converting"),
        (["checking", "verifying", "unpacking"], "activating"),
        ([], "staged"),
    ],
)
def test_skipping_stages_is_refused(path: list[str], bad: str) -> None:
    m = UpdateMachine("det")
    for st in path:
        m.advance(st)
    target = "staged" if bad == "active_then_staged" else bad
    with pytest.raises(TransitionError) as ei:
        m.advance(target)
    assert ei.value.code == "bad-transition"
    assert m.state == (path[-1] if path else "idle")
