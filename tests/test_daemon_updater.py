"""The update lifecycle table (data) and the machine that applies it."""

from __future__ import annotations

import pytest

from agent.errors import TransitionError
from agent.updater import IN_FLIGHT, STATES, TRANSITIONS, UpdateMachine

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


def test_repository_path_downloads_before_verifying() -> None:
    """A repository package: checking → downloading → verifying; a download either
    reaches verifying or fails (nothing else follows it), and a crash in it is in flight."""
    m = UpdateMachine("det")
    for st in ["checking", "downloading", *HAPPY[1:]]:
        m.advance(st)
    assert m.state == "active"
    assert TRANSITIONS["downloading"] == {"verifying", "failed"}
    assert "downloading" in IN_FLIGHT
    m.advance("checking")
    m.advance("downloading")
    m.advance("failed", error="[repo-download] cut")
    with pytest.raises(TransitionError):
        UpdateMachine("x", state="downloading").advance("unpacking")


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        (["checking"], "active_then_staged"),
        (["checking", "downloading"], "unpacking"),
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


# --- the check job over real packages, a real store and the registry ---------------------

import asyncio  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from agent.errors import UpdateError  # noqa: E402
from tests.daemon_util import make_package, signing_key  # noqa: E402
from tests.helpers import drop_in_inbox, updater_setup  # noqa: E402


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("pkgs")
    key, trust = signing_key(work)
    out = {"trust": trust}
    for v, scale in (("1", 2.0), ("2", 3.0), ("3", 4.0)):
        out[v] = make_package(work, key, "tiny", v, scale=scale)
    other = tmp_path_factory.mktemp("other")
    okey, _otrust = signing_key(other)
    out["untrusted"] = make_package(other, okey, "tiny", "9")
    return out


def test_check_installs_swaps_and_rolls_back(tmp_path: Path, pkgs: dict[str, Path]) -> None:
    async def go() -> None:
        _cfg, store, reg, up, made = updater_setup(tmp_path, pkgs["trust"])
        assert (await up.check()).to_dict()["installed"] == {}
        drop_in_inbox(tmp_path, pkgs["1"])
        res = await up.check()
        assert res.installed == {"tiny": "1"} and res.failed == {}
        assert store.current("tiny") == "1" and reg.get("tiny").version == "1"
        # newest of several wins; older ones are "unchanged"
        drop_in_inbox(tmp_path, pkgs["2"])
        drop_in_inbox(tmp_path, pkgs["3"])
        res = await up.check()
        assert res.installed == {"tiny": "3"}
        assert (store.current("tiny"), store.previous("tiny")) == ("3", "1")
        assert store.versions("tiny") == ["1", "3"]
        assert made[0].state == "stopped" and reg.get("tiny").version == "3"
        res = await up.check()
        assert res.installed == {} and res.unchanged == ["tiny"]
        out = await up.rollback("tiny")
        assert out == {"name": "tiny", "current": "1", "previous": "3"}
        assert reg.get("tiny").version == "1" and store.current("tiny") == "1"
        assert up.machines["tiny"].state == "rolled-back"
        journal = json.loads(store.journal_path.read_text())
        assert journal["models"]["tiny"]["state"] == "rolled-back"
        assert journal["models"]["tiny"]["version"] == "1"
        assert up.transitions["active"] == 2 and up.transitions["verifying"] == 2

    asyncio.run(go())


def test_refused_packages_keep_old_version(tmp_path: Path, pkgs: dict[str, Path]) -> None:
    async def go() -> None:
        _cfg, store, reg, up, _made = updater_setup(
            tmp_path, pkgs["trust"], fail={"3": "self_test"}
        )
        drop_in_inbox(tmp_path, pkgs["1"])
        await up.check()
        # untrusted signer: refused at verification, file moved aside with the reason
        drop_in_inbox(tmp_path, pkgs["untrusted"])
        res = await up.check()
        assert "tiny-9.emp" in res.failed and "unknown-signer" in res.failed["tiny-9.emp"]
        assert (tmp_path / "inbox" / "tiny-9.emp.rejected").exists()
        assert not (tmp_path / "inbox" / "tiny-9.emp").exists()
        # tampered: one byte flipped in the payload
        bad = bytearray(pkgs["2"].read_bytes())
        bad[-2000] ^= 0xFF
        (tmp_path / "inbox" / "tiny-2.emp").write_bytes(bytes(bad))
        res = await up.check()
        # the scan reads only the signed manifest; the payload is verified once, while
        # unpacking, so the failure is the install's (keyed by model name)
        assert res.installed == {} and "tiny" in res.failed
        # a version whose self-test fails: failed, removed, old version still serving
        assert (tmp_path / "inbox" / "tiny-2.emp.rejected").exists()
        drop_in_inbox(tmp_path, pkgs["3"])
        res = await up.check()
        assert "tiny" in res.failed and "self-test" in res.failed["tiny"]
        assert reg.get("tiny").version == "1" and store.current("tiny") == "1"
        assert store.versions("tiny") == ["1"]
        assert (tmp_path / "inbox" / "tiny-3.emp.rejected").exists()
        assert "self-test" in (tmp_path / "inbox" / "tiny-3.emp.rejected.reason").read_text()
        assert up.machines["tiny"].state == "failed"
        assert list(store.staging_dir.iterdir()) == []
        with pytest.raises(UpdateError) as ei:
            await up.rollback("tiny")
        assert ei.value.code == "no-previous"

    asyncio.run(go())


def test_interrupted_update_becomes_failed_at_start(tmp_path: Path, pkgs: dict[str, Path]) -> None:
    _cfg, store, _reg, _up, _made = updater_setup(tmp_path, pkgs["trust"])
    store.write_journal(
        {"models": {"tiny": {"state": "unpacking", "version": "1", "target": "2", "since": 1.0}}}
    )
    _cfg, store, _reg, up, _made = updater_setup(tmp_path, pkgs["trust"])
    m = up.machines["tiny"]
    assert m.state == "failed" and "interrupted" in (m.error or "")
    assert json.loads(store.journal_path.read_text())["models"]["tiny"]["state"] == "failed"


def test_start_up_journal_writes_keep_every_model(
    tmp_path: Path, pkgs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first journal write at start (an interrupted update becoming failed) happens
    once every model's record is read: a crash right after it must not lose another
    model's refused versions."""
    _cfg, store, _reg, _up, _made = updater_setup(tmp_path, pkgs["trust"])
    store.write_journal(
        {
            "models": {
                "a": {"state": "downloading", "version": "1", "target": "2", "since": 1.0},
                "b": {"state": "active", "version": "5", "bad": {"6": "[unhealthy] x"}},
            }
        }
    )
    from agent.store import Store

    first: list[dict[str, object]] = []
    real = Store.write_journal

    def spy(self: Store, data: dict[str, object]) -> None:
        if not first:
            first.append(json.loads(json.dumps(data)))
        real(self, data)

    monkeypatch.setattr(Store, "write_journal", spy)
    _cfg, store, _reg, up, _made = updater_setup(tmp_path, pkgs["trust"])
    assert up.machines["a"].state == "failed"
    models = first[0]["models"]
    assert isinstance(models, dict) and models["b"]["bad"] == {"6": "[unhealthy] x"}, models


def test_a_link_switch_that_fails_stops_the_prepared_worker(
    tmp_path: Path, pkgs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk can refuse even the new ``current`` symlink after the new version's
    worker started: the update fails as disk-full (retried later, not refused), that
    worker is stopped, and the old version keeps serving; the same for a rollback."""
    import errno

    from agent.store import Store

    async def go() -> None:
        _cfg, store, reg, up, made = updater_setup(tmp_path, pkgs["trust"])
        drop_in_inbox(tmp_path, pkgs["1"])
        assert (await up.check()).installed == {"tiny": "1"}
        drop_in_inbox(tmp_path, pkgs["2"])
        real = Store.activate

        def full(self: Store, name: str, version: str) -> str | None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(Store, "activate", full)
        res = await up.check()
        assert "[disk-full]" in res.failed["tiny"], res.failed
        assert made[-1].version == "2" and made[-1].state == "stopped"
        assert reg.get("tiny").version == "1" and store.current("tiny") == "1"
        assert not up.is_bad("tiny", "2")
        monkeypatch.setattr(Store, "activate", real)
        drop_in_inbox(tmp_path, pkgs["2"])
        assert (await up.check(retry_deferred=True)).installed == {"tiny": "2"}
        monkeypatch.setattr(Store, "rollback", lambda self, name: full(self, name, ""))
        with pytest.raises(OSError):
            await up.rollback("tiny")
        assert made[-1].version == "1" and made[-1].state == "stopped"
        assert reg.get("tiny").version == "2" and store.current("tiny") == "2"
        # nothing moved: no intent left for a restart to finish, no mark on 2
        assert up.machines["tiny"].rollback is None and not up.is_bad("tiny", "2")

    asyncio.run(go())
