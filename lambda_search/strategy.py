"""Search strategies: what a study trains. A strategy is asked, under the claim lock, for every
point the study has or should train, given what the study holds; the loop that claims a
point, leases it, trains its folds and records the outcome (``lambda_search.search.worker``)
is written once and knows no strategy: ask, run, tell (the record is the telling: the next ask
reads it). So a strategy must be a pure function of its arguments: every worker, a resume and
``status`` ask it and must get the same answer. No torch, no Optuna here.

The strategy is named in the config (``search.strategy``) and stored with the study: "grid"
(the paper's: every lambda of ``search.lambdas``, repeat by repeat, then the baseline), or
one of your own as ``module:attribute`` (a Strategy, or a class that makes one).
"""

from __future__ import annotations

import importlib
from typing import Protocol, Sequence, runtime_checkable

from .config import Config, ConfigError, check_lambda
from .points import Point, PointStatus, grid_points

__all__ = ["Strategy", "Grid", "STRATEGIES", "strategy_for", "asked_points"]


@runtime_checkable
class Strategy(Protocol):
    def ask(self, config: Config, tried: Sequence[PointStatus]) -> list[Point]:
        """Every point the study has or should train, in the order to train them, given what
        it holds (``tried``: each point tried so far, its state, folds and mean). A point
        already tried and left out of the answer keeps its trials (status shows it)."""


class Grid:
    """The paper's grid: ``search.lambdas`` repeat by repeat, then the baseline network when
    ``search.baseline`` is on, whatever has been tried."""

    def ask(self, config: Config, tried: Sequence[PointStatus]) -> list[Point]:
        return grid_points(config)


STRATEGIES = {"grid": Grid()}


def strategy_for(name: str) -> Strategy:
    """The strategy called ``name``: a registered one, or ``module:attribute``."""
    if name in STRATEGIES:
        return STRATEGIES[name]
    module, _, attr = name.partition(":")
    try:
        found = getattr(importlib.import_module(module), attr)
    except Exception as exc:  # (a user's module: whatever it raises as it is imported)
        raise ConfigError(f"search.strategy={name!r}: cannot import {attr!r} from module {module!r} "
                          f"({type(exc).__name__}: {exc})") from None
    strategy = found() if isinstance(found, type) else found
    if not isinstance(strategy, Strategy):
        raise ConfigError(f"search.strategy={name!r} has no ask(config, tried) method")
    return strategy


def asked_points(config: Config, tried: Sequence[PointStatus]) -> list[Point]:
    """What the study's strategy asks for, checked: Points, each lambda a valid one, each
    repeat one of ``search.repeats`` (the folds exist for those only), none twice."""
    name = config.search.strategy
    strategy = strategy_for(name)
    try:
        asked = list(strategy.ask(config, tried))
    except Exception as exc:  # (a user's code: whatever it raises)
        raise ConfigError(f"search.strategy={name!r}: its ask raised {type(exc).__name__}: {exc}") from None
    seen = set()
    for point in asked:
        if not isinstance(point, Point):
            raise ConfigError(f"search.strategy={name!r} asked for {point!r}, not a Point")
        if not point.baseline:
            check_lambda(point.e_lambda, f"search.strategy={name!r}: a lambda it asks for")
        if not 0 <= point.repeat < config.search.repeats:
            raise ConfigError(f"search.strategy={name!r} asked for repeat {point.repeat}: the study has "
                              f"search.repeats = {config.search.repeats} (repeats 0 to {config.search.repeats - 1})")
        if point.key in seen:
            raise ConfigError(f"search.strategy={name!r} asked for {point.label()} twice")
        seen.add(point.key)
    return asked
