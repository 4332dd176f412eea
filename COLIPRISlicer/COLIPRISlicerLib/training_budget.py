"""Time budgets of training loops: how many epochs fit, from the epochs done so far."""

from __future__ import annotations

import math


def epochs_that_fit(planned: int, done: int, phase_seconds: float, elapsed_seconds: float,
                    max_minutes: float | None) -> int:
    """How many epochs the phase can run in all: ``planned``, or fewer if the time budget ends first.

    Args:
        planned: epochs planned so far.
        done: epochs finished.
        phase_seconds: seconds those epochs took.
        elapsed_seconds: seconds since the budget started (e.g. phantom generation included).
        max_minutes: the run's budget, or None for no limit.

    Returns:
        A number in ``[done, planned]``: no epoch starts that would end past the budget, and
        a learning-rate schedule can be fitted to end with the last one.
    """
    if max_minutes is None:
        return planned
    per_epoch = phase_seconds / done
    more = math.floor((60 * max_minutes - elapsed_seconds) / per_epoch)
    return max(done, min(planned, done + more))
