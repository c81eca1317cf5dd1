"""The projected wall time of a study from the seconds its steps take: the line a search
prints as it starts, and ``bench``'s projection. Arithmetic only; ``_measure`` times the steps."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace

from ..train.plan import Plan

__all__ = ["Projection", "project", "project_rounds", "search_trainings", "evaluation_trainings", "format_seconds",
           "format_range", "BUSY_SHARE"]


@dataclass(frozen=True)
class Projection:
    trainings: int  # (point, fold) pairs
    iterations: int  # training steps of all of them
    eval_images: int  # validation images evaluated, epoch after epoch
    seconds: float  # the central estimate: from the median round of each measurement
    packs: dict | None = None  # attention ("simam"/"none") -> folds trained at once
    low: float | None = None  # seconds from the fastest round of each measurement
    high: float | None = None  # seconds from the slowest round of each measurement
    rounds: int = 0  # timed rounds behind low..high (0: step times given, not measured)
    steps: int = 0  # training steps a round timed
    cpu_share: float | None = None  # CPU time the timed steps got / (wall time x threads); CPU only

    def describe(self) -> str:
        """One line: the work, the central estimate and, where measured, the range of the
        timed rounds; where the timed steps did not get their CPU (a busy machine), the share
        they got and the estimate scaled by it (the study's time should the machine free up)."""
        text = (f"{self.trainings} trainings, {self.iterations:,} iterations and {self.eval_images:,} "
                f"validation images: {format_seconds(self.seconds)}")
        if self.rounds and self.low is not None and self.high is not None:
            text += (f" ({format_range(self.low, self.high)}: {self.rounds} round{'s' if self.rounds > 1 else ''} "
                     f"of {self.steps} step{'s' if self.steps > 1 else ''}, fastest..slowest)")
        if self.cpu_share is not None and self.cpu_share < BUSY_SHARE:
            text += (f"; the timed steps got {self.cpu_share:.0%} of their CPU time, a busy machine: about "
                     f"{format_seconds(self.seconds * self.cpu_share)} at full speed")
        return text


# below this share of their CPU time (process CPU time / wall time x threads) the timed
# steps waited on other jobs, and describe() says so
BUSY_SHARE = 0.8


def _unit(seconds: float) -> tuple[float, str, str]:
    """(divisor, suffix, number format) format_seconds writes ``seconds`` in."""
    if seconds < 120:
        return 1, " s", ".0f"
    if seconds < 2 * 3600:
        return 60, " min", ".1f"
    if seconds < 3 * 86400:
        return 3600, " h", ".1f"
    return 86400, " days", ".1f"


def format_seconds(seconds: float) -> str:
    divisor, suffix, fmt = _unit(seconds)
    return f"{seconds / divisor:{fmt}}{suffix}"


def format_range(low: float, high: float) -> str:
    """``low``-``high`` seconds in the unit of ``high``: "45-110 s", "1.2-3.4 min"."""
    divisor, suffix, fmt = _unit(high)
    return f"{low / divisor:{fmt}}-{high / divisor:{fmt}}{suffix}"


def search_trainings(plan: Plan) -> list[tuple[str, int, int, int]]:
    """Every training of ``plan``'s search: (attention, training images, validation images,
    validation passes), a pass where train.eval_every says and at the end."""
    train, out = plan.train, []
    for point in plan.points:
        for fold in plan.folds_of(point.repeat):
            n_train = len(fold.train)
            epochs = math.ceil(train.total_iterations(n_train) / (n_train // train.batch_size))
            passes = sum(1 for e in range(1, epochs + 1) if e % train.eval_every == 0 or e == epochs)
            out.append((point.attention, n_train, len(fold.val), passes))
    return out


def evaluation_trainings(plan: Plan, seeds: int = 3) -> list[tuple[str, int, int, int]]:
    """The final evaluation of ``plan``'s search (``lambda-search evaluate``): the chosen
    lambda and the network without SimAM, ``seeds`` each, on every image the folds were
    made from, the test split once at the end (its size where known, else none counted)."""
    return [(attention, len(plan.data), plan.test_images or 0, 1)
            for attention in ("simam", "none") for _ in range(seeds)]


def project(plan: Plan, step_seconds: dict[str, float], eval_images_per_s: float,
            packs: dict | None = None, trainings: list | None = None) -> Projection:
    """Wall time on one worker of ``trainings`` (default: every point and fold of ``plan``'s
    search; see :func:`evaluation_trainings`): training steps at ``step_seconds[attention]``
    ("simam" or "none": seconds per iteration of one training, a pack's step divided by its
    size) plus every validation pass."""
    trainings = search_trainings(plan) if trainings is None else trainings
    iterations = eval_images = 0
    seconds = 0.0
    for attention, n_train, n_val, passes in trainings:
        total = plan.train.total_iterations(n_train)
        iterations += total
        eval_images += passes * n_val
        seconds += total * step_seconds[attention] + passes * n_val / eval_images_per_s
    return Projection(len(trainings), iterations, eval_images, seconds, packs)


def project_rounds(plan: Plan, step_rounds: dict[str, list[float]], eval_rates: list[float],
                   packs: dict | None = None, steps: int = 0, cpu_share: float | None = None,
                   trainings: list | None = None) -> Projection:
    """:func:`project` from timed rounds: ``step_rounds[attention]`` the seconds per iteration
    of one training in each round, ``eval_rates`` validation images/s of each timed pass.
    ``seconds`` from the medians; ``low`` from the fastest round of each, ``high`` from the
    slowest (so low <= seconds <= high)."""
    def at(pick_step, pick_eval) -> Projection:
        return project(plan, {a: pick_step(v) for a, v in step_rounds.items()}, pick_eval(eval_rates), packs,
                       trainings)

    central = at(statistics.median, statistics.median)
    rounds = min((len(v) for v in step_rounds.values()), default=0)
    return replace(central, low=at(min, max).seconds, high=at(max, min).seconds, rounds=rounds, steps=steps,
                   cpu_share=cpu_share)
