"""A lightweight fleet simulator for the benchmarks: many simulated devices per process.

Shared by ``benchmarks/fleet_bench.py`` and ``benchmarks/scale_bench.py``; never imported by
product code (it lives beside the benchmarks, which put this directory on ``sys.path`` by
running from it).

- :mod:`fleet_sim.mqtt_wire`: a minimal MQTT 5 client's packets, enough for a device
  (paho's one thread per client does not scale to thousands of clients on 2 cores).
- :mod:`fleet_sim.device`: one simulated device: a non-blocking TLS connection with its own
  certificate, and on the wire what the agent does (agent/fleet_link.py,
  agent/bundle_fetch.py): chunk fetch with the agent's window and back-off, or a download
  over HTTP(S) from the desired state's URLs, then the agent's events and reports.
- :mod:`fleet_sim.http_download`: that download (range requests to resume).
- :mod:`fleet_sim.worker`: a worker process driving its share of the devices in one
  ``selectors`` loop, and the parent's :class:`~fleet_sim.worker.WorkerPool`.
- :mod:`fleet_sim.fixtures`: what a benchmark prepares: a signed bundle, device identities on
  disk, the open-file limit, a work directory; and :func:`~fleet_sim.fixtures.percentile`.

Skipped on purpose, because they are device-local work that real devices do in parallel on
their own CPUs and disks, not load on the server: writing the ``.part`` file with an fsync
per chunk (chunks are hashed in memory), the signature check (optional: ``verify``), loading
the model, and the probation period.
"""
