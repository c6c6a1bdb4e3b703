"""Downloading and unpacking in one pass (issue 12): the unpacker reads the ``.part`` file
behind the downloader through a ``Tail`` (agent/repository/client.py). Against a real
nginx: the reader gets exactly the package's bytes and sees their end only once the
download matched the signed length and hash; a download that starts over (a server that
ignores ``Range``) or fails breaks the reader instead of handing it other bytes."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from agent.config import RepositoryConfig
from agent.errors import RepositoryError
from agent.repository.client import Offer, RepositoryClient, Tail, TailBroken
from tests.nginx_util import Nginx, needs_nginx

pytestmark = [needs_nginx]


class _Fields:
    model, version, kind = "big", "2", "full"


def _setup(tmp_path: Path, size: int, **nginx: Any) -> tuple[Nginx, RepositoryClient, bytes]:
    root = tmp_path / "www" / "targets"
    root.mkdir(parents=True)
    data = hashlib.shake_256(b"edgeward").digest(size)
    (root / "big-2.emp").write_bytes(data)
    web = Nginx(tmp_path / "nginx", tmp_path / "www", **nginx)
    cfg = RepositoryConfig(
        urls=(web.url + "/",), ca_bundle=web.ca_bundle, root=tmp_path / "none", retries=0
    )
    return web, RepositoryClient(cfg, tmp_path / "state"), data


def _offer(data: bytes) -> Offer:
    sha = hashlib.sha256(data).hexdigest()
    return Offer(_Fields(), "big-2.emp", len(data), {"sha256": sha}, "big-2.emp")  # type: ignore[arg-type]


def _follow(tail: Tail) -> tuple[threading.Thread, dict[str, Any]]:
    got: dict[str, Any] = {"data": bytearray()}

    def run() -> None:
        try:
            while piece := tail.read(1 << 20):
                got["data"] += piece
        except TailBroken as exc:
            got["error"] = exc
        finally:
            tail.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, got


def test_the_reader_gets_the_verified_bytes(tmp_path: Path) -> None:
    web, client, data = _setup(tmp_path, 5 << 20)
    part = tmp_path / "big-2.part"
    try:
        tail = Tail(part)
        t, got = _follow(tail)
        client.download(_offer(data), part, tail)
        t.join(30)
        assert "error" not in got and bytes(got["data"]) == data
    finally:
        client.close()
        web.stop()


def test_a_resumed_download_is_read_from_its_start(tmp_path: Path) -> None:
    web, client, data = _setup(tmp_path, 3 << 20)
    part = tmp_path / "big-2.part"
    offer = _offer(data)
    expect = {"path": offer.path, "length": offer.length, "hashes": offer.hashes}
    part.write_bytes(data[:1234567])  # what an earlier, cut attempt kept
    part.with_name(part.name + ".json").write_text(json.dumps(expect, sort_keys=True))
    try:
        tail = Tail(part)
        t, got = _follow(tail)
        client.download(offer, part, tail)
        t.join(30)
        assert "error" not in got and bytes(got["data"]) == data
        assert client.stats.resumes == 1
    finally:
        client.close()
        web.stop()


def test_a_download_that_starts_over_breaks_the_reader(tmp_path: Path) -> None:
    # "max_ranges 0": nginx answers a Range request with the whole file (200)
    web, client, data = _setup(tmp_path, 3 << 20, extra_server="max_ranges 0;")
    part = tmp_path / "big-2.part"
    offer = _offer(data)
    expect = {"path": offer.path, "length": offer.length, "hashes": offer.hashes}
    part.write_bytes(data[:1000000])
    part.with_name(part.name + ".json").write_text(json.dumps(expect, sort_keys=True))
    try:
        tail = Tail(part)
        t, got = _follow(tail)
        assert client.download(offer, part, tail) == part  # the download itself is fine
        t.join(30)
        assert isinstance(got["error"], TailBroken), got.keys()
        assert "started over" in got["error"].message
        assert part.read_bytes() == data
    finally:
        client.close()
        web.stop()


def test_a_wrong_hash_never_reaches_the_end_of_the_tail(tmp_path: Path) -> None:
    web, client, data = _setup(tmp_path, 2 << 20)
    part = tmp_path / "big-2.part"
    bad = Offer(_Fields(), "big-2.emp", len(data), {"sha256": "0" * 64}, "big-2.emp")  # type: ignore[arg-type]
    try:
        tail = Tail(part)
        t, got = _follow(tail)
        with pytest.raises(RepositoryError) as err:
            client.download(bad, part, tail)
        assert err.value.code == "repo-hash"
        t.join(30)
        # every byte may have been read, but the end of the file never came: the reader
        # fails instead of finishing on bytes the metadata does not vouch for
        assert isinstance(got["error"], TailBroken) and "repo-hash" not in got
        assert not part.exists()
    finally:
        client.close()
        web.stop()


def test_an_abandoned_tail_stops_the_download_and_keeps_the_part(tmp_path: Path) -> None:
    """The reader gave up for a reason more bytes cannot cure (the unpack found the disk
    full): the download stops at its next piece instead of filling the disk for
    nothing, keeps what it has for a resume, and a later attempt completes."""
    web, client, data = _setup(tmp_path, 4 << 20, limit_rate=1 << 20)
    part = tmp_path / "big-2.part"
    offer = _offer(data)
    try:
        tail = Tail(part)

        def reader() -> None:
            while tail.read(1 << 16):
                if tail._pos >= 256 << 10:  # a quarter MiB in: give up
                    tail.abandon("the disk is full")
                    return

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        with pytest.raises(RepositoryError) as err:
            client.download(offer, part, tail)
        t.join(30)
        assert err.value.code == "repo-abandoned" and "the disk is full" in err.value.message
        kept = part.stat().st_size
        assert 256 << 10 <= kept < len(data) // 2, kept  # stopped soon after, not at the end
        assert part.read_bytes() == data[:kept]
        tail.close()
        assert client.download(offer, part) == part  # the next attempt resumes
        assert part.read_bytes() == data and client.stats.resumes == 1
    finally:
        client.close()
        web.stop()
