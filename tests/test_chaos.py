"""The short chaos run in CI: a handful of SIGKILLs of the parent and its 2 workers, resumed
each time; `python tests/chaos.py --kills 50` is the long one (README, Reliability)."""

import pytest
from chaos import Chaos

pytestmark = pytest.mark.slow


def test_a_search_survives_random_kills_with_nothing_lost_or_done_twice(tmp_path):
    figures = Chaos(tmp_path / "chaos", kills=6, seed=1).run(log=lambda s: None)
    assert figures.kills == 6 and figures.studies_finished >= 1
    assert figures.ok() and not figures.violations, figures.report()
