"""The package choice (agent.sources.choose) and the [repository] config section."""

from __future__ import annotations

import pytest

from agent.config import parse_config
from agent.errors import ConfigError
from agent.repository.client import Offer
from agent.repository.fields import TargetFields
from agent.sources import choose

D1 = {"m.onnx": "sha256:" + "1" * 64}
D2 = {"m.onnx": "sha256:" + "2" * 64}


def _offer(
    version: str, kind: str = "full", base: str | None = None, digests=None, channels=("stable",)
) -> Offer:  # type: ignore[no-untyped-def]
    f = TargetFields("m", version, tuple(channels), kind, base, dict(digests or {}))
    return Offer(
        f, f"m/{version}/{kind}", 1000 if kind == "full" else 100, {"sha256": "0" * 64}, "x"
    )


OFFERS = [
    _offer("1"),
    _offer("2"),
    _offer("2", "residual", "1", D1),
    _offer("3", channels=("canary",)),
    _offer("3", "residual", "2", D2, channels=("canary",)),
]


def _choose(current: str | None, digests: dict[str, str], *, channel: str = "stable", bad=()):  # type: ignore[no-untyped-def]
    calls: list[int] = []

    def dig() -> dict[str, str]:
        calls.append(1)
        return digests

    offer, why = choose(
        OFFERS,
        name="m",
        channel=channel,
        current=current,
        digests=dig,
        is_bad=lambda n, v: v in bad,
    )
    return offer, why, len(calls)


def test_residual_when_the_base_is_what_the_box_has() -> None:
    offer, why, calls = _choose("1", D1)
    assert offer is not None and offer.fields.kind == "residual" and "residual from 1" in why
    assert calls == 1


def test_full_when_the_digests_differ() -> None:
    offer, why, _ = _choose("1", D2)
    assert offer is not None and offer.fields.kind == "full" and "digests differ" in why


def test_full_when_the_base_version_differs_and_no_hashing_then() -> None:
    offer, why, calls = _choose(None, D1)
    assert offer is not None and offer.fields.version == "2" and offer.fields.kind == "full"
    assert calls == 0 and "needs base 1" in why


def test_channel_newest_and_nothing_newer() -> None:
    offer, _why, _ = _choose("2", D2, channel="canary")
    assert offer is not None and (offer.fields.version, offer.fields.kind) == ("3", "residual")
    offer, why, _ = _choose("2", D2)
    assert offer is None and "nothing newer than 2" in why


def test_bad_versions_are_skipped() -> None:
    offer, _why, _ = _choose("1", D1, bad=("2",))
    assert offer is None
    offer, _why, _ = _choose(None, D1, bad=("2",))  # the newest is bad: the one before
    assert offer is not None and offer.fields.version == "1"


def test_residual_only_without_a_matching_base_is_no_choice() -> None:
    offers = [_offer("4", "residual", "3", D1)]
    offer, why = choose(
        offers, name="m", channel="stable", current="1", digests=dict, is_bad=lambda n, v: False
    )
    assert offer is None and "no full package" in why and "needs base 3" in why


def test_repository_section() -> None:
    cfg = parse_config(
        {"repository": {"urls": ["https://a/", "https://b/r/"], "channel": "canary"}}
    )
    assert cfg.repository is not None and cfg.repository.urls == ("https://a/", "https://b/r/")
    assert parse_config({}).repository is None


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ({"urls": []}, "repository.urls"),
        ({"urls": ["http://a/"]}, "repository.urls"),
        ({"urls": ["https://a/?x=1"]}, "repository.urls"),
        ({"urls": "https://a/"}, "repository.urls: expected a list"),
        ({"urls": ["https://a/"], "channel": "Stable"}, "repository.channel"),
        ({"urls": ["https://a/"], "client_cert": "/c.pem"}, "client_key"),
        ({"urls": ["https://a/"], "read_timeout": 0}, "repository.read_timeout"),
        ({"urls": ["https://a/"], "max_download_bytes": -1}, "repository.max_download_bytes"),
        ({"urls": ["https://a/"], "mirror": "x"}, "unknown key repository.mirror"),
    ],
)
def test_repository_section_errors_name_the_key(table: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config({"repository": table})
    assert words in ei.value.message


def test_health_window_keys() -> None:
    cfg = parse_config({"updates": {"health_window_s": 30, "health_max_error_rate": 0.2}})
    assert cfg.updates.health_window_s == 30.0
    with pytest.raises(ConfigError, match=r"updates\.health_max_error_rate"):
        parse_config({"updates": {"health_max_error_rate": 0}})
