"""The numbers do not move: every built-in algorithm's metrics on the golden setting (tests/golden/record.py)
equal the recorded ones bit for bit, every column except wall-clock timings."""
from __future__ import annotations

import csv

import pytest

from tests.golden.record import GROUPS, HERE, TIMINGS, run_all


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    return run_all(tmp_path_factory.mktemp("golden"))


@pytest.mark.parametrize("algo", [a for algos in GROUPS.values() for a in algos])
def test_metrics_equal_the_golden_files(fresh, algo):
    def rows(path):
        with open(path, newline="") as f:
            return [{k: v for k, v in row.items() if k not in TIMINGS} for row in csv.DictReader(f)]

    golden, now = rows(HERE / f"{algo}.csv"), rows(fresh[algo])
    assert [r["step"] for r in now] == [r["step"] for r in golden]
    for before, after in zip(golden, now):
        assert after.keys() == before.keys()
        changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
        assert not changed, f"{algo} step {before['step']}: {changed}"
