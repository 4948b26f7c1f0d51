"""The experiment status: rows per arm, the verdict, and latency-like metrics."""

from __future__ import annotations

from experiments.status import StatusOptions, experiment_status
from stats.bandit import ArmStats


def test_running_then_winner() -> None:
    close = {"a": ArmStats(100, 50.0, 50.0), "b": ArmStats(100, 55.0, 55.0)}
    status = experiment_status("exp", close)
    assert status["verdict"] == "running"
    assert status["winner"] is None
    assert [row["arm"] for row in status["arms"]] == ["a", "b"]
    assert all(row["lower"] <= row["mean"] <= row["upper"] for row in status["arms"])
    clear = {"a": ArmStats(5000, 2500.0, 2500.0), "b": ArmStats(5000, 3500.0, 3500.0)}
    status = experiment_status("exp", clear)
    assert status["verdict"] == "winner"
    assert status["winner"] == "b"
    assert status["arms"][1]["probability_best"] > 0.99
    assert experiment_status("exp", clear) == status  # the same sums read the same


def test_lower_is_better() -> None:
    # Latency in ms clipped to [0, 100]: arm "fast" averages 20 ms, "slow" 60 ms.
    arms = {"fast": ArmStats(3000, 60_000.0, 1.3e6), "slow": ArmStats(3000, 180_000.0, 1.1e7)}
    status = experiment_status("lat", arms, StatusOptions(low=0.0, high=100.0,
                                                          higher_is_better=False,
                                                          family="normal"))
    assert status["winner"] == "fast"
    assert status["arms"][0]["probability_best"] > 0.99
