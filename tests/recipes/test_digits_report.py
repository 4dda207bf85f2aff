"""The digits report says what ran: DMD only, reward only or DMDR (tiny settings, seconds each)."""

from __future__ import annotations

import pytest
from tests.test_cli import TINY

from dmdr_fast.cli import main
from dmdr_fast.config import DMDRTrainerConfig
from dmdr_fast.configs import load_preset


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # one tiny teacher for every run below


@pytest.mark.parametrize(
    ("extra", "says", "never"),
    [
        (["rewards=[]"], ["(DMD only)", "student (1-step DMD only)", "DMD only (no reward): 4 generator steps, "
                          "at stage 2's learning rates from step 2"], ["DMDR", "DMD + reward"]),
        (["dmdr.dmd_weight=0", "dmdr.cold_start_steps=0"], ["(reward only)", "student (1-step reward only)",
                                                           "reward only (no DMD term)"], ["DMDR", "DMD only"]),
        ([], ["(DMDR)", "student (1-step DMDR)", "DMDR: 2 generator steps of DMD only, then 2 of DMD + reward "
              "(classifier)"], ["reward only", "(DMD only)"]),
    ],
    ids=["dmd-only", "reward-only", "dmdr"],
)  # fmt: skip
def test_report_names_the_method(tmp_path, cache, extra, says, never):
    sets = [a for kv in [*TINY, "monitor.every=0", *extra] for a in ("--set", kv)]
    out = tmp_path / "run"
    assert (
        main(["train", "--preset", "digits", "--out", str(out), "--cache-dir", str(cache), "--quiet", *sets])
        == 0
    )
    report = (out / "report.md").read_text()
    for text in says:
        assert text in report, text
    for text in never:
        assert text not in report, text


def test_method_names_of_the_presets_and_variants():
    digits = load_preset("digits")
    assert digits.method_name == "DMDR"
    assert (
        digits.training_summary()
        == "DMDR: 400 generator steps of DMD only, then 200 of DMD + reward (classifier)"
    )
    assert digits.with_overrides(["rewards=[]"]).method_name == "DMD only"
    assert digits.with_overrides(["rewards=[]", "dmdr.cold_start_steps=0"]).training_summary() == (
        "DMD only (no reward): 600 generator steps"
    )
    grpo = load_preset("digits-grpo")
    assert grpo.method_name == "GRPO + DMD"
    assert grpo.with_overrides(["rl.regularizer=none"]).method_name == "GRPO, no regulariser"
    assert DMDRTrainerConfig().method_name == "DMD only"  # no reward configured
