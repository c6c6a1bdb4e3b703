"""Prometheus metrics of the daemon, rendered by prometheus_client.

The daemon's counters live where they are counted (``ModelRegistry.stats``, the
``Updater``); a custom collector reads them at scrape time, so nothing is counted twice
and a scrape costs nothing between scrapes. ``prometheus_client`` writes the exposition
(text format 0.0.4), adds ``process_*`` (CPU, memory, fds, start time of the daemon)
and ``edgeward_build_info``. Every per-model family carries a ``model`` label.

Served on the control socket (``GET /metrics``, administrators) and on the metrics
socket (``[metrics] socket``, readable by ``[metrics] group``; optionally
``127.0.0.1:[metrics] port``), which answers nothing else. docs/METRICS.md has the
family list and example alerts.

prometheus_client is imported at the first scrape, not at startup: a device nobody
scrapes keeps the idle daemon ~2.5 MiB smaller (it pulls in http.server and wsgiref).
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.serving.http import Request, Response
from agent.serving.registry import LATENCY_BUCKETS

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

    from agent.daemon import Daemon
    from agent.mqtt import MqttStats

__all__ = ["CONTENT_TYPE", "DaemonCollector", "MetricsApp", "registry_for", "render_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class DaemonCollector:
    """Reads the daemon's live counters at each scrape (a prometheus_client collector)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )

        from agent.updater import STATES

        d = self.daemon
        info = InfoMetricFamily("edgeward_build", "Edgeward version and Python it runs on.")
        info.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield info

        stats = sorted(d.registry.stats().items())
        req = CounterMetricFamily(
            "edgeward_requests", "Inference requests that reached a model.", labels=["model"]
        )
        err = CounterMetricFamily(
            "edgeward_request_errors", "Inference requests a model failed.", labels=["model"]
        )
        swaps = CounterMetricFamily(
            "edgeward_model_swaps", "Hot swaps of a model's serving version.", labels=["model"]
        )
        lat = HistogramMetricFamily(
            "edgeward_request_duration_seconds", "Model call latency.", labels=["model"]
        )
        for name, s in stats:
            req.add_metric([name], s.requests)
            err.add_metric([name], s.errors)
            swaps.add_metric([name], s.swaps)
            cum, buckets = 0, []
            for bound, count in zip(LATENCY_BUCKETS, s.buckets, strict=True):
                cum += count
                buckets.append((repr(bound), cum))
            buckets.append(("+Inf", s.requests))
            lat.add_metric([name], buckets, s.latency_sum)
        yield from (req, err, lat, swaps)

        rss = GaugeMetricFamily(
            "edgeward_worker_rss_bytes", "Resident memory of each model worker.",
            labels=["model", "version"],
        )  # fmt: skip
        restarts = CounterMetricFamily(
            "edgeward_worker_restarts", "Worker process restarts after a crash.",
            labels=["model", "version"],
        )  # fmt: skip
        ready = GaugeMetricFamily(
            "edgeward_model_ready", "1 when the model's serving worker is ready.",
            labels=["model", "version"],
        )  # fmt: skip
        for wm in d.registry.models():
            desc = wm.describe()
            labels = [str(desc["name"]), str(desc["version"])]
            rss.add_metric(labels, float(desc.get("rss_bytes") or 0))
            restarts.add_metric(labels, float(desc.get("restarts") or 0))
            ready.add_metric(labels, float(wm.ready))
        yield from (rss, restarts, ready)

        if d.mqtt is not None:
            yield from _mqtt_families(d.mqtt.stats)

        up = d.updater
        if up is None:
            return
        state = GaugeMetricFamily(
            "edgeward_update_state", "Current update state per model (1 = in state).",
            labels=["model", "state"],
        )  # fmt: skip
        for name, mach in sorted(up.machines.items()):
            for st in STATES:
                state.add_metric([name, st], float(mach.state == st))
        trans = CounterMetricFamily(
            "edgeward_update_transitions", "Update state transitions per model and target state.",
            labels=["model", "state"],
        )  # fmt: skip
        for (name, st), n in sorted(up.model_transitions.items()):
            trans.add_metric([name, st], n)
        yield from (state, trans)
        checks = CounterMetricFamily("edgeward_update_checks", "Update checks run.")
        checks.add_metric([], up.checks)
        fails = CounterMetricFamily(
            "edgeward_update_failures", "Update checks or installs that failed."
        )
        fails.add_metric([], up.check_failures)
        yield from (checks, fails)
        results = CounterMetricFamily(
            "edgeward_update_check_results", "Update checks by outcome.", labels=["outcome"]
        )
        for outcome, n in sorted(up.outcomes.items()):
            results.add_metric([outcome], n)
        yield results
        repo = up.status()
        if repo:
            yield from _repository_families(repo)


def _repository_families(repo: dict[str, Any]) -> Iterator[Metric]:
    """The TUF repository source (agent/sources.py): transfer, resumes, metadata expiry."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    got = CounterMetricFamily(
        "edgeward_repository_bytes_downloaded", "Package bytes downloaded from the repository."
    )
    got.add_metric([], repo["bytes_downloaded"])
    meta = CounterMetricFamily(
        "edgeward_repository_metadata_bytes", "Metadata bytes downloaded from the repository."
    )
    meta.add_metric([], repo["metadata_bytes"])
    resumes = CounterMetricFamily("edgeward_repository_resumes", "Downloads resumed with Range.")
    resumes.add_metric([], repo["resumes"])
    expires = GaugeMetricFamily(
        "edgeward_repository_metadata_expires_seconds",
        "Unix time each trusted metadata role expires.",
        labels=["role"],
    )
    for role, ts in sorted(repo["expires"].items()):
        expires.add_metric([role], ts)
    err = GaugeMetricFamily("edgeward_repository_error", "1 when the last repository check failed.")
    err.add_metric([], float(repo["last_error"] is not None))
    yield from (got, meta, resumes, expires, err)


def _mqtt_families(st: MqttStats) -> Iterator[Metric]:
    """The MQTT link (agent/mqtt.py): connection, reconnects, commands, rate limit."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    conn = GaugeMetricFamily("edgeward_mqtt_connected", "1 while connected to an MQTT broker.")
    conn.add_metric([], float(st.connected))
    rec = CounterMetricFamily("edgeward_mqtt_reconnects", "Successful MQTT reconnections.")
    rec.add_metric([], st.reconnects)
    cmds = CounterMetricFamily(
        "edgeward_mqtt_commands", "MQTT commands by kind and outcome.", labels=["kind", "outcome"]
    )
    for (kind, outcome), n in sorted(st.commands.items()):
        cmds.add_metric([kind, outcome], n)
    limited = CounterMetricFamily(
        "edgeward_mqtt_triggers_rate_limited",
        "Check triggers that coalesced into a running or pending check (rate limit).",
    )
    limited.add_metric([], st.rate_limited)
    dropped = CounterMetricFamily(
        "edgeward_mqtt_dropped", "MQTT messages dropped because the event loop was behind."
    )
    dropped.add_metric([], st.handoff_dropped)
    yield from (conn, rec, cmds, limited, dropped)


class _Registries:
    """One CollectorRegistry per daemon (process_* read /proc/self at scrape time)."""

    def __init__(self) -> None:
        self._by_daemon: dict[int, CollectorRegistry] = {}

    def get(self, daemon: Daemon) -> CollectorRegistry:
        from prometheus_client import CollectorRegistry
        from prometheus_client.process_collector import ProcessCollector

        reg = self._by_daemon.get(id(daemon))
        if reg is None:
            reg = CollectorRegistry(auto_describe=False)
            ProcessCollector(registry=reg)
            reg.register(DaemonCollector(daemon))
            self._by_daemon = {id(daemon): reg}  # one daemon per process
        return reg


_registries = _Registries()


def registry_for(daemon: Daemon) -> CollectorRegistry:
    """The daemon's registry: its collector plus ``process_*``."""
    return _registries.get(daemon)


def render_metrics(daemon: Daemon) -> bytes:
    """The exposition text for one scrape."""
    from prometheus_client import generate_latest

    return generate_latest(_registries.get(daemon))


class MetricsApp:
    """The metrics socket's app: ``GET /metrics`` and nothing else, to anyone who can
    open the socket (its file mode and group are the gate)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def __call__(self, request: Request) -> Response:
        path = request.path.split("?", 1)[0]
        if path != "/metrics":
            return Response(404, {"content-type": "text/plain"}, b"only /metrics here\n")
        if request.method not in ("GET", "HEAD"):
            return Response(405, {"content-type": "text/plain", "allow": "GET"}, b"")
        return Response(200, {"content-type": CONTENT_TYPE}, render_metrics(self.daemon))
