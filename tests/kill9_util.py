"""``kill -9`` of a daemon updating from a real repository, at random moments.

One rig: nginx serving a TUF repository, a daemon following it. Each round publishes
the next version, starts a check, kills the daemon's whole process group at a random
moment within the measured update time (so the kills land in download, verify, unpack,
convert and activate), then checks the store: ``current`` is the old or the new
version and its weights digest is that version's (never a mix), every installed
version is complete, staging holds nothing but the resumable download; then restarts
the daemon and checks again: the update completes. Shared by
``tests/test_repo_device_kill9.py`` (≥ 50 rounds) and ``bench/bench_update.py``
(≥ 200 rounds, ``update_kill9_points``).
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.daemon_util import DaemonProc, http_unix, signing_key, start_daemon, write_config
from tests.nginx_util import Nginx
from tests.repo_util import TufRepo, big_onnx, fields_of, write_repo_config


@dataclass
class Kill9Result:
    points: int = 0
    inconsistent: list[str] = field(default_factory=list)
    phases: Counter[str] = field(default_factory=Counter)
    update_s: float = 0.0


class Kill9Rig:
    """Build with :meth:`create`, run :meth:`round` as often as wanted, :meth:`close`."""

    def __init__(self, work: Path, *, mib: int = 1, rate: int | None = 4 << 20) -> None:
        from agent.keys import load_private

        self.work = work
        self.mib = mib
        self.key_path, self.trust = signing_key(work / "keys")
        self.key = load_private(self.key_path)
        self.repo = TufRepo.create(work / "repo")
        self.nginx = Nginx(work / "nginx", work / "repo", limit_rate=rate)
        self.digests: dict[str, str] = {}
        self.version = 0
        self.rng = random.Random(20261202)
        rtable = write_repo_config(work, self.nginx, self.repo, retries=1, backoff_s=0.1)
        self.config = write_config(work / "d", trust_dir=self.trust, extra=rtable)
        self.d: DaemonProc | None = None
        self.result = Kill9Result()

    def _package(self, version: int) -> Path:
        from agent.package import PackSpec, pack
        from agent.residual import weights_digest

        model = big_onnx(
            self.work / "models" / str(version) / "big.onnx", mib=self.mib, seed=version
        )
        self.digests[str(version)] = weights_digest(model)
        out = self.work / "pkgs" / f"big-{version}.emp"
        out.parent.mkdir(parents=True, exist_ok=True)
        pack(PackSpec(models=[model], name="big", version=version, signing_keys=[self.key]), out)
        return out

    def publish_next(self) -> str:
        self.version += 1
        pkg = self._package(self.version)
        self.repo.add(pkg, fields_of(pkg))
        self.repo.publish()
        # keep the repository small: older targets are never needed again
        for path in list(self.repo.md["targets"].signed.targets):
            if not path.startswith(f"big/{self.version}/"):
                self.repo.remove(path)
        return str(self.version)

    def start(self) -> DaemonProc:
        self.d = start_daemon(self.work / "d", config=self.config)
        return self.d

    def check(self, timeout: float = 180.0) -> dict[str, object]:
        assert self.d is not None
        _s, _h, body = http_unix(self.d.control_sock, "POST", "/check", timeout=timeout)
        out: dict[str, object] = json.loads(body)
        return out

    def serving(self) -> str | None:
        assert self.d is not None
        _s, _h, body = http_unix(self.d.control_sock, "GET", "/status")
        return json.loads(body)["models"].get("big")  # type: ignore[no-any-return]

    def create(self) -> Kill9Rig:
        """v1 installed, then one clean update timed (the window kills are spread over)."""
        self.publish_next()
        self.start()
        assert self.check()["installed"] == {"big": "1"}
        v = self.publish_next()
        t0 = time.monotonic()
        assert self.check()["installed"] == {"big": v}
        self.result.update_s = time.monotonic() - t0
        return self

    def _inspect(self, old: str, new: str) -> str:
        """The store after a kill; returns the journal's update state (the phase hit)."""
        from agent.residual import weights_digest

        state = self.work / "d" / "state"
        try:
            journal = json.loads((state / "journal.json").read_bytes())
            phase = str(journal["models"]["big"]["state"])
        except (OSError, ValueError, KeyError):
            phase = "unknown"
        mdir = state / "models" / "big"
        cur = Path(str((mdir / "current").readlink())).name
        if cur not in (old, new):
            self.result.inconsistent.append(f"current is {cur}, not {old} or {new}")
            return phase
        for vdir in sorted((mdir / "versions").iterdir()):
            if vdir.name.startswith(".") or ".tmp" in vdir.name:
                continue  # debris Store.open() removes
            model = vdir / "Model" / "big.onnx"
            if not (vdir / "manifest.json").is_file() or not model.is_file():
                self.result.inconsistent.append(f"version {vdir.name} is incomplete")
                continue
            if weights_digest(model) != self.digests.get(vdir.name):
                self.result.inconsistent.append(f"version {vdir.name} has foreign weights")
        return phase

    def round(self) -> None:
        """One kill point: publish, check, kill at random, inspect, restart, complete."""
        assert self.d is not None
        old = self.serving()
        assert old is not None
        new = self.publish_next()
        t = threading.Thread(target=lambda: _quiet_check(self), daemon=True)
        t.start()
        time.sleep(self.rng.uniform(0.0, self.result.update_s * 1.1))
        self.d.kill()
        t.join(30)
        phase = self._inspect(old, new)
        self.result.phases[phase] += 1
        self.start()
        staging = sorted(p.name for p in (self.work / "d" / "state" / "staging").iterdir())
        if staging not in ([], [f"big-{new}.part", f"big-{new}.part.json"]):
            self.result.inconsistent.append(f"staging after restart: {staging}")
        res = self.check()
        served = self.serving()
        if served != new:
            self.result.inconsistent.append(f"after the restart {served} serves, not {new}: {res}")
        self.result.points += 1

    def close(self) -> None:
        if self.d is not None:
            self.d.stop()
        self.nginx.stop()


def _quiet_check(rig: Kill9Rig) -> None:
    with contextlib.suppress(OSError, ValueError):
        rig.check(timeout=60)
