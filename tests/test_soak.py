"""The short soak (python -m pagedserve.benchmarks.soak --scale 0.02): a few hundred malformed and
hostile requests to every RPC, cancelled LLM streams, mixed load with load/unload cycles and a SIGTERM
under load, against a real server. No INTERNAL/UNKNOWN, no crash, a clean exit, resources back."""

from __future__ import annotations

import pytest
from pagedserve.benchmarks import soak

pytestmark = pytest.mark.slow


def test_short_soak_is_clean() -> None:
    report = soak.run(scale=0.02, seconds=5.0, extra=[], log=lambda message: None)
    text = report.render()
    assert report.tally.bad_count() == 0, text
    assert report.crashes == 0 and report.exit_code == 0, text
    assert report.ok(), text
    assert sum(report.tally.codes["malformed"].values()) >= 40  # the abuse really ran
    assert report.tally.codes["probe"]["OK"] > 0
