"""Statistics shared by the agent (monitoring, shadow runs) and the fleet server (rollout
gates, fleet aggregation): pure functions and small records over numpy arrays, no I/O.

- :mod:`stats.histogram`: fixed-bin histograms that stream at constant memory and merge
  across requests, devices and time; their JSON form is what devices report.
- :mod:`stats.drift`: distances between two histograms on the same bins (PSI, binned KS).
- :mod:`stats.outputs`: what outputs say (confidence, entropy, predicted classes) and how far
  two models agree (top-1, cosine, relative error, confidence shift).
- :mod:`stats.bounds`: confidence bounds on rates from few observations (Wilson), so that
  1 failure of 3 devices is judged as the weak evidence it is.
- :mod:`stats.sequential`: confidence sequences valid at every sample size, and the A/B
  rule built on them, so an experiment may be looked at as often as the operator likes.
- :mod:`stats.bandit`: per-arm sufficient statistics that add, and Thompson sampling on
  Beta or Normal posteriors.
"""

from __future__ import annotations
