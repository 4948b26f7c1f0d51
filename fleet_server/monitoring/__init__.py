"""Monitoring of the fleet: time series of what devices report, alerts, Prometheus metrics
and the web dashboard (docs/monitoring.md).

==================  =====================================================================
``samples``         *pure*: what is read from a telemetry sample, defensively and bounded
``series``          *pure*: sums of observations; error rates and latency quantiles
``overview``        *pure*: devices online, versions per group, convergence
``alerts``          *pure*: an alert's life (fire, group repeats, resolve); rule conditions
``config``          the ``[monitoring]`` table of the server's TOML config
``notifier``        webhooks: bounded queues, timeouts, retries with back-off
``monitor``         :class:`~.monitor.Monitor`: ingest hook, evaluation thread, queries
``prometheus``      the ``/metrics`` exposition (prometheus_client)
``api_routes``      what the operator API's monitoring routes answer
``text``            *pure*: the figures as ``fleet metrics`` and ``fleet device show`` print
``dashboard``       the web dashboard's files (HTML, JS, CSS; package data)
==================  =====================================================================

The registry keeps the data (``fleet_server.registry.metric_series`` and ``.alerts``). This
module imports nothing, so the registry can import the pure modules without a cycle.
"""
