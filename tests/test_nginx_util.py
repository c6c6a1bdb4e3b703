"""The nginx test fixture does what the repository tests rely on: real HTTPS with a
trustme CA, ranges, a slow link, redirects, bad certificates, stop/start on one port and
an access log that counts bytes."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import requests

from tests.nginx_util import Nginx, needs_nginx

pytestmark = [pytest.mark.e2e, needs_nginx]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    (root / "metadata").mkdir(parents=True)
    (root / "metadata" / "timestamp.json").write_text('{"signed": {}}')
    (root / "big.bin").write_bytes(os.urandom(1 << 20))
    return root


def test_serves_https_and_logs_each_request(tmp_path: Path, site: Path) -> None:
    with Nginx(tmp_path / "ngx", site) as web:
        assert web.url.startswith("https://127.0.0.1:")
        r = requests.get(f"{web.url}/metadata/timestamp.json?x=1", verify=str(web.ca_bundle))
        assert r.status_code == 200 and r.json() == {"signed": {}}
        assert r.headers["Content-Type"] == "application/json"
        r = requests.get(
            f"{web.url}/big.bin", headers={"Range": "bytes=1000-"}, verify=str(web.ca_bundle)
        )
        assert r.status_code == 206 and r.content == (site / "big.bin").read_bytes()[1000:]
        assert requests.get(f"{web.url}/nope", verify=str(web.ca_bundle)).status_code == 404
        log = web.wait_log(3)
        assert [(e.path, e.status) for e in log] == [
            ("/metadata/timestamp.json", 200),
            ("/big.bin", 206),
            ("/nope", 404),
        ]
        assert log[1].body_bytes == (1 << 20) - 1000
        assert log[1].bytes_sent > log[1].body_bytes  # headers counted too
        assert log[1].range == "bytes=1000-" and log[0].range == ""
        web.clear_log()
        assert web.log() == []


def test_plain_http_is_refused_by_a_client_without_the_ca(tmp_path: Path, site: Path) -> None:
    with Nginx(tmp_path / "ngx", site) as web, pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{web.url}/big.bin", timeout=10)


def test_limit_rate_makes_a_slow_link(tmp_path: Path, site: Path) -> None:
    with Nginx(tmp_path / "ngx", site, limit_rate=4096) as web:
        got = 0
        with requests.get(
            f"{web.url}/big.bin", stream=True, verify=str(web.ca_bundle), timeout=10
        ) as r:
            end = time.monotonic() + 1.0
            for chunk in r.iter_content(1024):
                got += len(chunk)
                if time.monotonic() > end:
                    break
        # a loaded machine only makes this smaller; unlimited it would be the whole MiB
        assert 0 < got < 256 * 1024
        (entry,) = web.wait_log(1)
        assert entry.path == "/big.bin" and entry.body_bytes < (1 << 20)


def test_redirect_to_another_server(tmp_path: Path, site: Path) -> None:
    other_root = tmp_path / "other"
    (other_root / "r").mkdir(parents=True)
    (other_root / "r" / "x.bin").write_bytes(b"elsewhere")
    with Nginx(tmp_path / "b", other_root) as b:
        target = f"https://localhost:{b.port}"
        with Nginx(tmp_path / "a", site, redirects={"/r/": target}, ca=b.ca) as a:
            r = requests.get(f"{a.url}/r/x.bin", verify=str(a.ca_bundle), allow_redirects=False)
            assert r.status_code == 302 and r.headers["Location"] == f"{target}/r/x.bin"
            r = requests.get(f"{a.url}/r/x.bin", verify=str(a.ca_bundle))
            assert r.content == b"elsewhere" and r.url == f"{target}/r/x.bin"
            assert [e.status for e in a.wait_log(2)] == [302, 302]
            assert [e.path for e in b.wait_log(1)] == ["/r/x.bin"]


@pytest.mark.parametrize(("cert", "reason"), [("expired", "expired"), ("wrong-host", "match")])
def test_bad_certificates_are_refused(tmp_path: Path, site: Path, cert: str, reason: str) -> None:
    with Nginx(tmp_path / "ngx", site, cert=cert) as web:
        with pytest.raises(requests.exceptions.SSLError, match=reason):
            requests.get(f"{web.url}/big.bin", verify=str(web.ca_bundle), timeout=10)
        web.reconfigure(cert="good")
        r = requests.get(f"{web.url}/big.bin", verify=str(web.ca_bundle), timeout=10)
        assert r.status_code == 200


def test_stop_start_keeps_the_port_and_reconfigure(tmp_path: Path, site: Path) -> None:
    web = Nginx(tmp_path / "ngx", site)
    try:
        port, pid = web.port, web.proc.pid if web.proc else 0
        web.stop()
        assert not web.running
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        web.start()
        assert web.port == port and web.proc is not None and web.proc.pid != pid
        assert requests.get(f"{web.url}/big.bin", verify=str(web.ca_bundle)).ok
        web.reconfigure(extra_server="location = /big.bin { return 503; }")
        assert web.port == port
        r = requests.get(f"{web.url}/big.bin", verify=str(web.ca_bundle))
        assert r.status_code == 503
        assert [e.status for e in web.wait_log(2)] == [200, 503]
        with pytest.raises(TypeError, match="unknown nginx option"):
            web.reconfigure(limit=1)
    finally:
        web.stop()
    assert not web.running
