"""The A/B harness: one workload run under two or more KSM settings, trial after trial.

``engine`` (run_ab, the trial loop) drives a workload from ``workloads`` (synthetic, command or
PIDs; started through ``running``, the child side in ``child``, both speaking ``channel``'s JSON
lines; the built-in mix described in ``synthetic``) while ``sampler`` watches the counters; each
trial is a ``records.TrialRecord``, ``stats`` summarises them (pure) and ``report`` writes the
table, JSON, CSV and figure."""
