"""Small mechanisms every part of edgefleet uses: durable file writes
(:mod:`common.atomic`) and command-line scaffolding (:mod:`common.cli`)."""
