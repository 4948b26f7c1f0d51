"""Rollouts: a model version taken to a fleet step by step, halted by health and by what
the model does (docs/rollouts.md).

==============  ========================================================================
``plan``        which devices each step takes (deterministic, stratified by profile)
``gates``       gate expressions and their judgement with one-sided bounds
``evidence``    one device's telemetry summed up for the gates
``model``       the records: spec, state, observations, actions; the state's JSON form
``controller``  the controller, pure: (state, observations, now) -> (state, actions)
``simulator``   a fleet of simulated devices with failure modes, for tests and benchmarks
``runner``      the adapter: registry in, controller, desired state and events out
``views``       the status as JSON and text (API, CLI)
==============  ========================================================================
"""

from __future__ import annotations
