"""Per-process Prometheus metrics of a worker, served on PMQ_WORKER_METRICS_PORT.

Fleet-wide totals (enqueued, applied, ... and the live status counts) are kept
in Redis by the job scripts and exposed by the frontend's /metrics; what is
here is what only this process sees: how long its Prefect calls and its jobs
took.
"""

from prometheus_client import Counter, Histogram

PREFECT_CALL_SECONDS = Histogram(
    "pmq_prefect_call_seconds",
    "Duration of one Prefect API call made by this worker.",
    ["call", "outcome"],
    # Fine around 1 s: the benchmarks read Prefect's p99 from this histogram.
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 30),
)
JOB_LATENCY_SECONDS = Histogram(
    "pmq_job_enqueue_to_terminal_seconds",
    "From the frontend accepting a change to this worker recording its final status.",
    ["status"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
JOBS_FINISHED = Counter(
    "pmq_worker_jobs_finished_total", "Jobs this worker brought to a final status.", ["status"]
)
