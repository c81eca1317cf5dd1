"""A search strategy of a user's own, as a user would write it: named in a config as
``search.strategy = "toy_strategies:Refine"``."""

import math

from lambda_search.points import Point, grid_points


class Refine:
    """The grid; once every grid point is done, the geometric midpoints between the best
    lambda and its neighbours in the grid (a pure function of what the study holds)."""

    def ask(self, config, tried):
        grid = grid_points(config)
        done = {s.point.key: s for s in tried if s.state in ("complete", "diverged")}
        if not all(p.key in done for p in grid):
            return grid
        scored = [done[p.key] for p in grid if not p.baseline and done[p.key].state == "complete"]
        best = max(scored, key=lambda s: (s.mean, s.point.e_lambda)).point.e_lambda
        lambdas = sorted(config.search.lambdas)
        i = lambdas.index(best)
        return grid + [Point(math.sqrt(best * lambdas[j])) for j in (i - 1, i + 1) if 0 <= j < len(lambdas)]


class NoAsk:
    """Not a strategy: it has no ask."""
