"""Serving several models under one name, decided in pure functions both sides share.

- :mod:`experiments.spec`: an experiment's declaration (arms and the models serving them,
  split, unit, strategy, reward range) and its JSON form.
- :mod:`experiments.assign`: which arm a device or a request gets, by hash (sticky) or at
  random per request.
- :mod:`experiments.posterior`: bandit learning across a fleet: devices send per-interval
  sufficient-statistic deltas with a sequence number, the server sums each once and pushes
  the merged posterior back, an offline device keeps learning on its own counts.
- :mod:`experiments.feedback`: outcome feedback: response ids remembered for a bounded
  time, reports parsed with bounds, a label turned into a reward.
- :mod:`experiments.status`: what ``fleet experiment status`` shows: per arm n, mean,
  always-valid interval, probability of being best, and the verdict.
- :mod:`experiments.composite`: ensembles (one answer from several members) and cascades (a
  cheap model first, the expensive one only when the cheap one is unsure), and the choice of
  a cascade's threshold on an evaluation set.

The statistics under them (Thompson sampling, always-valid A/B decisions) are in
:mod:`stats.bandit` and :mod:`stats.sequential`. Errors: :mod:`experiments.errors`.
"""

from __future__ import annotations
