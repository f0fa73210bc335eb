"""The console's line per step: the demonstrations' NLL where a step learned one, the sampling speed
only where a step sampled."""

from __future__ import annotations

from sdcli.cli.train import step_line
from sdcli.core.metric_names import DEMO_NLL_STUDENT, DEMO_NLL_TEACHER, DIVERGENCE, LOSS, TOKENS_PER_S

STEP = {LOSS: 1.25, DIVERGENCE: 0.5, "response/mean_tokens": 21.9, "time/step_s": 2.125}


def test_an_off_policy_step_shows_how_far_the_student_is_from_the_demonstrations_and_no_sampling_speed():
    line = step_line({**STEP, TOKENS_PER_S: 0.0, DEMO_NLL_STUDENT: 0.4321, DEMO_NLL_TEACHER: 0.1666}, "=", " ")
    assert line == "loss=1.2500 divergence=0.5000 demo_nll=0.432/0.167 len=21.9 step_s=2.12"


def test_a_sampled_step_shows_its_sampling_speed_and_no_demonstration():
    line = step_line({**STEP, TOKENS_PER_S: 40.04}, " ", "  ")
    assert line == "loss 1.2500  divergence 0.5000  len 21.9  tok/s 40.0  step_s 2.12"
