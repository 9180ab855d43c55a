"""Every bad input in tests/bad_inputs.py: exit 1, one line "jointrank: error: ..." naming the problem, no
traceback, nothing written, the sources untouched. Fails on any other outcome (a traceback, exit 0, a leftover)."""

import pytest
from bad_inputs import CASES, Base, available, quiet_transformers, run_case, verdict


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    quiet_transformers()
    return Base.build(tmp_path_factory.mktemp("pristine"))


def test_the_table_is_large_enough():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(base, tmp_path, case):
    if not available(case):
        pytest.skip(f"needs {case.needs}")
    outcome = run_case(case, base, tmp_path / "work")
    assert verdict(case, outcome) == "ok", outcome
