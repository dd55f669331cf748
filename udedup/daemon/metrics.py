"""Prometheus text exposition of the daemon's rounds, on a loopback address.

:class:`DaemonCollector` is client_python's ``process_collector.py`` shape: built over a source
(``source()`` returns the latest :class:`~.snapshot.RoundSnapshot`, or None before the first
round), it turns that snapshot into metric families at scrape time. The snapshot is immutable, so
the HTTP thread never touches the daemon's live state or sysfs.

Names follow Prometheus's conventions (``promtool check metrics`` finds nothing): counters end in
``_total``, sizes in ``_bytes``, durations in ``_seconds``, no type in a name. README's "Metrics"
table lists them beside node_exporter's ksmd collector, and every rename.
"""
from __future__ import annotations

import logging
import socket
import socketserver
import threading
import wsgiref.simple_server
from typing import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry

from .configvalues import parse_address
from .snapshot import RoundSnapshot

log = logging.getLogger(__name__)

MODES = ("fast", "slow", "stopped", "hold")

# KSM's sysfs counters -> (metric name, type, help). node_exporter's ksmd collector has the same
# names for pages_* and full_scans_total (node_ksmd_*). Files not listed here (a newer kernel's)
# go to udedup_ksm_sysfs_value{file=...}.
KSM_COUNTERS = {
    "pages_shared": ("udedup_ksm_pages_shared", "gauge", "KSM pages in use (pages_shared)"),
    "pages_sharing": ("udedup_ksm_pages_sharing", "gauge",
                      "pages merged into a KSM page, i.e. pages saved (pages_sharing)"),
    "pages_unshared": ("udedup_ksm_pages_unshared", "gauge",
                       "pages scanned with no twin found yet (pages_unshared)"),
    "pages_volatile": ("udedup_ksm_pages_volatile", "gauge",
                       "pages changing too fast to merge (pages_volatile)"),
    "ksm_zero_pages": ("udedup_ksm_ksm_zero_pages", "gauge",
                       "pages merged into the zero page (ksm_zero_pages, use_zero_pages=1)"),
    "full_scans": ("udedup_ksm_full_scans_total", "counter", "full scans ksmd completed (full_scans)"),
    "pages_scanned": ("udedup_ksm_pages_scanned_total", "counter", "pages ksmd scanned (pages_scanned)"),
    "pages_skipped": ("udedup_ksm_pages_skipped_total", "counter",
                      "pages smart_scan skipped (pages_skipped)"),
    "general_profit": ("udedup_ksm_general_profit_bytes", "gauge",
                       "the kernel's saving estimate, rmap items paid (general_profit)"),
    "stable_node_chains": ("udedup_ksm_stable_node_chains", "gauge",
                           "KSM pages past max_page_sharing, chained (stable_node_chains)"),
    "stable_node_dups": ("udedup_ksm_stable_node_dups", "gauge",
                         "duplicate KSM pages in those chains (stable_node_dups)"),
}

#: pid and name labels of the one series that sums the processes past metrics.max_process_series,
#: and the cgroup label of the one summing the cgroups past metrics.max_cgroup_series
OTHER = "other"


def _gauge(name, doc, value):
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], float(value))
    return g


def _counter(name, doc, value):
    c = CounterMetricFamily(name, doc)     # the exposition names it name (_total once)
    c.add_metric([], float(value))
    return c


def capped(processes, limit: int) -> tuple[list, list]:
    """(the ``limit`` processes with the largest saving, realized then predicted then anonymous
    memory, in that order; the rest)."""
    ranked = sorted(processes, key=lambda p: (p.realized_saved_bytes, p.predicted_saved_bytes or 0,
                                              p.anon_rss, -p.pid), reverse=True)
    return ranked[:limit], ranked[limit:]


class DaemonCollector:
    """A prometheus_client collector over the snapshot ``source()`` returns at scrape time."""

    def __init__(self, source: Callable[[], RoundSnapshot | None],
                 max_process_series: Callable[[], int] = lambda: 50):
        self.source = source
        self.max_process_series = max_process_series     # read at scrape time: SIGHUP may change it

    def describe(self):
        return []   # names depend on the kernel's counters: no up-front description

    def collect(self):
        s = self.source()
        up = GaugeMetricFamily("udedup_up", "1 once the daemon has completed a round")
        up.add_metric([], 1 if s is not None and s.last is not None else 0)
        yield up
        if s is None or s.last is None:
            return
        yield from self._ksm(s)
        yield from self._cpu(s)
        yield from self._savings(s)
        yield from self._processes(s, max(0, int(self.max_process_series())))
        yield from self._domains(s)
        yield from self._activity(s)

    @staticmethod
    def _ksm(s: RoundSnapshot):
        r = s.last
        yield _counter("udedup_rounds_total", "policy rounds run", s.rounds)
        yield _gauge("udedup_dry_run", "1 when the daemon only decides and logs",
                     int(s.identity.dry_run))
        yield _gauge("udedup_saved_bytes", "memory KSM saves now, kernel figure (general_profit)",
                     r.saved_bytes)
        if r.true_saved_bytes is not None:
            yield _gauge("udedup_true_saved_bytes",
                         "memory the host really gets back: (pages_sharing + ksm_zero_pages + "
                         "mergeable pages on the zero page outside KSM) x page size",
                         r.true_saved_bytes)
            yield _gauge("udedup_zero_mapped_pages",
                         "mergeable pages on the zero page outside KSM's counters (zero subpages "
                         "of split THPs; pages read but never written too)", r.zero_mapped_pages)
            yield _gauge("udedup_true_savings_read_seconds",
                         "time the last round took to read the true saving", r.true_read_seconds)
        counters = r.counters
        for file, (name, kind, doc) in KSM_COUNTERS.items():
            if file in counters:
                make = _counter if kind == "counter" else _gauge
                yield make(name, f"{doc}, /sys/kernel/mm/ksm/{file}", counters[file])
        other = GaugeMetricFamily("udedup_ksm_sysfs_value",
                                  "other read-only files of /sys/kernel/mm/ksm, as the kernel shows "
                                  "them", labels=["file"])
        for file, value in sorted(counters.items()):
            if file not in KSM_COUNTERS:
                other.add_metric([file], float(value))
        yield other
        knob = GaugeMetricFamily("udedup_ksm_knob", "numeric KSM knobs, as the kernel shows them "
                                 "(sleep_millisecs in milliseconds)", labels=["knob"])
        for name, value in sorted(r.knobs.items()):
            if isinstance(value, (bool, int, float)):
                knob.add_metric([name], float(value))
        yield knob
        if isinstance(r.knobs.get("sleep_millisecs"), (int, float)):
            yield _gauge("udedup_ksm_sleep_seconds", "ksmd's sleep between batches "
                         "(sleep_millisecs / 1000)", r.knobs["sleep_millisecs"] / 1000.0)

    @staticmethod
    def _cpu(s: RoundSnapshot):
        r = s.last
        yield _counter("udedup_ksmd_cpu_seconds_total", "CPU time of ksmd since it started",
                       r.ksmd_cpu_seconds)
        yield _counter("udedup_daemon_cpu_seconds_total", "CPU time of the daemon",
                       r.daemon_cpu_seconds)
        if r.ksmd_cpu_percent is not None:
            yield _gauge("udedup_ksmd_cpu_percent",
                         "ksmd CPU over the last round, percent of one CPU", r.ksmd_cpu_percent)
        if r.daemon_cpu_percent is not None:
            yield _gauge("udedup_daemon_cpu_percent",
                         "daemon CPU over the last round, percent of one CPU", r.daemon_cpu_percent)
        yield _gauge("udedup_cpu_budget_percent", "CPU budget for ksmd plus the daemon",
                     s.cpu_budget_percent)
        if r.ksmd_cpu_percent is not None and s.cpu_budget_percent:
            used = (r.ksmd_cpu_percent + (r.daemon_cpu_percent or 0.0)) / s.cpu_budget_percent
            yield _gauge("udedup_cpu_budget_used_ratio", "ksmd + daemon CPU over the budget", used)
        yield _gauge("udedup_ksmd_seconds_per_page", "measured ksmd CPU per scanned page",
                     r.seconds_per_page)
        yield _gauge("udedup_scan_pages", "registered pages one full scan covers", r.scan_pages)
        yield _gauge("udedup_scan_target_pages_per_second", "scan rate the policy chose",
                     r.target_pages_per_second)
        yield _gauge("udedup_scan_budget_pages_per_second",
                     "highest scan rate the CPU budget allows", r.budget_pages_per_second)

    @staticmethod
    def _savings(s: RoundSnapshot):
        r = s.last
        mode = GaugeMetricFamily("udedup_mode", "the policy's ksmd mode", labels=["mode"])
        for m in MODES:
            mode.add_metric([m], 1.0 if s.mode == m else 0.0)
        yield mode
        yield _gauge("udedup_memory_pressure", "1 under memory pressure", int(r.pressure))
        yield _gauge("udedup_predicted_saved_bytes", "predicted saving of the managed processes",
                     r.predicted_bytes)
        yield _gauge("udedup_realized_saved_bytes", "realized saving of the managed processes",
                     r.realized_bytes)
        yield _gauge("udedup_unrealized_saved_bytes", "predicted but not yet realized",
                     r.unrealized_bytes)

    @staticmethod
    def _processes(s: RoundSnapshot, limit: int):
        """One series per candidate for the ``limit`` largest; the rest summed under
        pid="other", name="other" (its registered/worthwhile values count processes)."""
        pred = GaugeMetricFamily("udedup_process_predicted_saved_bytes",
                                 "estimator's predicted saving per candidate", labels=["pid", "name"])
        real = GaugeMetricFamily("udedup_process_realized_saved_bytes",
                                 "ksm_process_profit per candidate (counts the KSM page itself)",
                                 labels=["pid", "name"])
        reg = GaugeMetricFamily("udedup_process_registered", "1 when KSM scans the candidate",
                                labels=["pid", "name"])
        worth = GaugeMetricFamily("udedup_process_worthwhile",
                                  "1 when the prediction clears the thresholds", labels=["pid", "name"])
        shown, rest = capped(s.processes, limit)
        for p in shown:
            labels = [str(p.pid), p.name]
            if p.predicted_saved_bytes is not None:
                pred.add_metric(labels, float(p.predicted_saved_bytes))
            real.add_metric(labels, float(p.realized_saved_bytes))
            reg.add_metric(labels, 1.0 if p.registered else 0.0)
            worth.add_metric(labels, 1.0 if p.worthwhile else 0.0)
        if rest:
            labels = [OTHER, OTHER]
            pred.add_metric(labels, float(sum(p.predicted_saved_bytes or 0 for p in rest)))
            real.add_metric(labels, float(sum(p.realized_saved_bytes for p in rest)))
            reg.add_metric(labels, float(sum(1 for p in rest if p.registered)))
            worth.add_metric(labels, float(sum(1 for p in rest if p.worthwhile)))
        yield pred
        yield real
        yield reg
        yield worth
        yield _gauge("udedup_candidate_processes", "candidate processes the daemon tracks",
                     len(s.processes))
        yield _gauge("udedup_process_series_folded",
                     'candidates summed in the pid="other" series (metrics.max_process_series)',
                     len(rest))

    @staticmethod
    def _domains(s: RoundSnapshot):
        """Per-cgroup saving (metrics.per_cgroup: the ``max_cgroup_series`` largest, the rest
        summed under cgroup="other") and the cross-domain KSM frames (trust domains on)."""
        r = s.last
        if r.cgroups:
            limit = max(0, int(s.max_cgroup_series))
            shown, rest = r.cgroups[:limit], r.cgroups[limit:]
            saved = GaugeMetricFamily("udedup_cgroup_saved_bytes",
                                      "exact saving of the processes of a cgroup v2 group (each "
                                      "mapping of a KSM page mapped k times saves 1 - 1/k pages)",
                                      labels=["cgroup"])
            procs = GaugeMetricFamily("udedup_cgroup_processes",
                                      "processes with mergeable memory in the cgroup",
                                      labels=["cgroup"])
            for cgroup, saved_bytes, processes in shown:
                saved.add_metric([cgroup], float(saved_bytes))
                procs.add_metric([cgroup], float(processes))
            if rest:
                saved.add_metric([OTHER], float(sum(c[1] for c in rest)))
                procs.add_metric([OTHER], float(sum(c[2] for c in rest)))
            yield saved
            yield procs
            yield _gauge("udedup_cgroup_series_folded",
                         'cgroups summed in the cgroup="other" series (metrics.max_cgroup_series)',
                         len(rest))
        if r.cross_domain_frames is not None:
            yield _gauge("udedup_cross_domain_ksm_frames",
                         "KSM frames the round's audit found mapped from two trust domains "
                         "(before the daemon unregistered the losing side)", r.cross_domain_frames)

    @staticmethod
    def _activity(s: RoundSnapshot):
        yield _counter("udedup_estimate_bytes_total", "bytes the estimator was budgeted to read",
                       s.estimated_bytes_total)
        yield _gauge("udedup_estimate_budget_bytes_per_second", "estimator read budget",
                     s.scan_budget)
        yield _gauge("udedup_estimate_budget_tokens_bytes",
                     "estimator budget left (negative: in debt)", s.estimate_tokens)
        dec = CounterMetricFamily("udedup_decisions_total", "decisions taken, by kind", labels=["kind"])
        for kind, n in sorted(s.decisions_total.items()):
            dec.add_metric([kind], float(n))
        yield dec
        yield _counter("udedup_knob_writes_total", "knob writes by the daemon", s.knob_writes)
        yield _counter("udedup_external_knob_changes_total", "knob changes by someone else, detected",
                       s.external_changes)


class _Server(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    daemon_threads = True       # a stuck scraper must not keep the daemon from exiting


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, format, *args):   # noqa: A002 - the base class's signature
        pass                                # one line per scrape is noise in the journal


class MetricsServer:
    """``/metrics`` over HTTP on ``address`` (HOST:PORT; port 0 picks a free one).

    Our own small WSGI server rather than prometheus_client.start_http_server, which returns no
    handle to stop it before 0.20 (SIGHUP may move the address)."""

    def __init__(self, address: str, collector: DaemonCollector):
        from prometheus_client import make_wsgi_app

        host, port = parse_address(address)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        server_class = type("_Server", (_Server,), {
            "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
        try:
            self._server = wsgiref.simple_server.make_server(
                host, port, make_wsgi_app(self.registry), server_class, handler_class=_QuietHandler)
        except OSError as err:
            from ..errors import ConfigError
            raise ConfigError(f"metrics.address {address}: cannot listen: {err.strerror}; pick another "
                              "port or set metrics.address = \"\" to disable metrics",
                              path="metrics", key="metrics.address") from err
        self._thread = threading.Thread(target=self._server.serve_forever, name="udedup-metrics",
                                        daemon=True)
        self._thread.start()
        self.host = host
        self.port = self._server.server_port
        self.url = f"http://{host if ':' not in host else '[' + host + ']'}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
