"""The mutation benchmark's mutants stay applicable: each one's target text occurs exactly once
in its file and its tests exist (a refactor that moves the code would otherwise turn a mutant
into a silent "skipped" and the suite it checks would go unmeasured)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dapdee.bench.mutants import MUTATIONS, Mutation

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_each_mutant_finds_its_target_once_and_its_tests(mutation: Mutation) -> None:
    text = (ROOT / mutation.path).read_text()
    assert text.count(mutation.find) == 1, f"{mutation.path}: {mutation.find!r}"
    assert mutation.find != mutation.replace
    assert all((ROOT / t.split("::")[0]).is_file() for t in mutation.tests), mutation.tests
