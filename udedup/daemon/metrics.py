"""Prometheus text exposition of the daemon's rounds, on a loopback address.

:class:`DaemonCollector` is client_python's ``process_collector.py`` shape: built over a source
(``source()`` returns the latest :class:`~.snapshot.RoundSnapshot`, or None before the first
round), it turns that snapshot into metric families at scrape time. The snapshot is immutable, so
the HTTP thread never touches the daemon's live state or sysfs.
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

from .config import parse_address
from .snapshot import RoundSnapshot

log = logging.getLogger(__name__)

MODES = ("fast", "slow", "stopped", "hold")

# counters with their own metric name; the rest of sysfs goes to udedup_ksm_counter{counter=...}
NAMED_COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                  "ksm_zero_pages", "full_scans", "general_profit")


def _gauge(name, doc, value):
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], float(value))
    return g


def _counter(name, doc, value):
    c = CounterMetricFamily(name, doc)
    c.add_metric([], float(value))
    return c


class DaemonCollector:
    """A prometheus_client collector over the snapshot ``source()`` returns at scrape time."""

    def __init__(self, source: Callable[[], RoundSnapshot | None]):
        self.source = source

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
        yield from self._processes(s)
        yield from self._activity(s)

    @staticmethod
    def _ksm(s: RoundSnapshot):
        r = s.last
        yield _counter("udedup_rounds", "policy rounds run", s.rounds)
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
        for name in NAMED_COUNTERS:
            if name in counters:
                yield _gauge(f"udedup_ksm_{name}", f"/sys/kernel/mm/ksm/{name}", counters[name])
        if "pages_scanned" in counters:
            yield _counter("udedup_ksm_pages_scanned", "pages ksmd scanned (pages_scanned)",
                           counters["pages_scanned"])
        other = GaugeMetricFamily("udedup_ksm_counter", "other KSM counters", labels=["counter"])
        for name, value in sorted(counters.items()):
            if name not in NAMED_COUNTERS and name != "pages_scanned":
                other.add_metric([name], float(value))
        yield other
        knob = GaugeMetricFamily("udedup_ksm_knob", "numeric KSM knobs", labels=["knob"])
        for name, value in sorted(r.knobs.items()):
            if isinstance(value, (bool, int, float)):
                knob.add_metric([name], float(value))
        yield knob

    @staticmethod
    def _cpu(s: RoundSnapshot):
        r = s.last
        yield _counter("udedup_ksmd_cpu_seconds", "CPU time of ksmd since it started",
                       r.ksmd_cpu_seconds)
        yield _counter("udedup_daemon_cpu_seconds", "CPU time of the daemon", r.daemon_cpu_seconds)
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
    def _processes(s: RoundSnapshot):
        pred = GaugeMetricFamily("udedup_process_predicted_saved_bytes",
                                 "estimator's predicted saving per candidate", labels=["pid", "name"])
        real = GaugeMetricFamily("udedup_process_realized_saved_bytes",
                                 "ksm_process_profit per candidate (counts the KSM page itself)",
                                 labels=["pid", "name"])
        reg = GaugeMetricFamily("udedup_process_registered", "1 when KSM scans the candidate",
                                labels=["pid", "name"])
        worth = GaugeMetricFamily("udedup_process_worthwhile",
                                  "1 when the prediction clears the thresholds", labels=["pid", "name"])
        for p in s.processes:
            labels = [str(p.pid), p.name]
            if p.predicted_saved_bytes is not None:
                pred.add_metric(labels, float(p.predicted_saved_bytes))
            real.add_metric(labels, float(p.realized_saved_bytes))
            reg.add_metric(labels, 1.0 if p.registered else 0.0)
            worth.add_metric(labels, 1.0 if p.worthwhile else 0.0)
        yield pred
        yield real
        yield reg
        yield worth

    @staticmethod
    def _activity(s: RoundSnapshot):
        yield _counter("udedup_estimate_bytes", "bytes the estimator was budgeted to read",
                       s.estimated_bytes_total)
        yield _gauge("udedup_estimate_budget_bytes_per_second", "estimator read budget",
                     s.scan_budget)
        yield _gauge("udedup_estimate_budget_tokens_bytes",
                     "estimator budget left (negative: in debt)", s.estimate_tokens)
        dec = CounterMetricFamily("udedup_decisions", "decisions taken, by kind", labels=["kind"])
        for kind, n in sorted(s.decisions_total.items()):
            dec.add_metric([kind], float(n))
        yield dec
        yield _counter("udedup_knob_writes", "knob writes by the daemon", s.knob_writes)
        yield _counter("udedup_external_knob_changes", "knob changes by someone else, detected",
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
