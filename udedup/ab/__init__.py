"""The A/B harness: the engine, trial records, statistics, the counter sampler, the report and the
workloads it runs."""
