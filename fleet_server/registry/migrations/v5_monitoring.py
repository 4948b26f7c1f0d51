"""Schema v5: monitoring's time series and alert states (issue 12).

- ``metric_points``: telemetry summed per device, model version and time bucket
  (``resolution`` seconds long, starting at ``bucket``, Unix seconds): samples, requests,
  errors, the latency histogram on the server's fixed buckets (``h0`` .. ``h13``, see
  ``fleet_server.monitoring.samples.LATENCY_EDGES_MS``) and drift (largest PSI and KS, sum
  and count of PSIs, the input or output that drifted most). Minute points are rolled into
  hour points as they age, hour points are deleted after the retention.
- ``alerts``: one row per alert (kind, key): firing or resolved, since when, how often it
  was raised while firing. Shared by every server process, so replicas notify once.
"""

from __future__ import annotations

from fleet_server.registry.database import Tx

__all__ = ["HIST_COLUMNS", "upgrade"]

#: Latency histogram columns: one per bucket edge plus the overflow bucket.
HIST_COLUMNS = 14


def upgrade(tx: Tx) -> None:
    """Create the two tables."""
    hist = ",\n".join(f"h{i} BIGINT NOT NULL DEFAULT 0" for i in range(HIST_COLUMNS))
    tx.run(f"""CREATE TABLE metric_points (
        resolution INTEGER NOT NULL,
        bucket BIGINT NOT NULL,
        device_id TEXT NOT NULL REFERENCES devices (id),
        model TEXT NOT NULL,
        version BIGINT NOT NULL,
        samples BIGINT NOT NULL,
        requests BIGINT NOT NULL,
        errors BIGINT NOT NULL,
        {hist},
        psi_max DOUBLE PRECISION,
        ks_max DOUBLE PRECISION,
        psi_sum DOUBLE PRECISION NOT NULL DEFAULT 0,
        psi_n BIGINT NOT NULL DEFAULT 0,
        worst TEXT,
        PRIMARY KEY (resolution, bucket, device_id, model, version))""")
    tx.run("CREATE INDEX metric_points_bucket ON metric_points (bucket)")
    tx.run("CREATE INDEX metric_points_device ON metric_points (device_id, bucket)")
    tx.run("""CREATE TABLE alerts (
        kind TEXT NOT NULL,
        alert_key TEXT NOT NULL,
        state TEXT NOT NULL,
        summary TEXT NOT NULL,
        detail TEXT NOT NULL,
        first_at DOUBLE PRECISION NOT NULL,
        last_at DOUBLE PRECISION NOT NULL,
        raised BIGINT NOT NULL,
        resolved_at DOUBLE PRECISION,
        PRIMARY KEY (kind, alert_key))""")
