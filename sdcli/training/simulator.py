"""The user simulator of `signal.kind: interactions`, `mode: online`: a fresh follow-up to each sample.

In the logs, the user's follow-up answered the logged reply. The student's fresh sample y was never
shown to any user, so the signal asks a simulated user instead: the base model, prompted with the
conversation, y and the logged follow-up as the user's intent (`InteractionsBuilder.simulator_prompt`),
writes the user's next message, and the teacher sees that (the paper's online method).

Which model plays the user: the base model with every adapter off, earlier episodes' included. The
user does not change because the assistant learned something, so the simulator is the same model in
every episode of a run, and what episode 3 is taught does not depend on how episodes 1 and 2 shaped
the simulated user. It is the one model in memory, run under `active_adapters(model, [])`: no second
copy of the weights, and no adapter matmuls.

All of a step's simulator prompts go through one sampling call (`sample`, the loop's own helper);
greedy by default (`signal.simulator.temperature: 0`), which draws no random numbers, so the
training's random stream is the same as without a simulator. Its prompts are encoded like the
teacher's (`TeacherPromptEncoder`): one longer than the model's context leaves for the follow-up is
cut inside the conversation, reply and follow-up, never in the instructions.
"""

from __future__ import annotations

from collections.abc import Callable

from sdcli.models.rollout import SamplingSettings
from sdcli.models.sequences import TeacherPromptEncoder, teacher_prompt_limit
from sdcli.models.stack import active_adapters


def attach_user_simulator(signal, model, tokenizer, model_config, sample: Callable, log=lambda message: None) -> bool:
    """Hand `signal` a user simulator if it asks for one (`needs_user_simulator`); True if it did.

    `sample(prompt_ids, settings)` -> token ids per prompt: the loop's `sample_responses` with its
    model, tokenizer and stop tokens bound."""
    if not getattr(signal, "needs_user_simulator", False):
        return False
    cfg = signal.cfg.simulator
    settings = SamplingSettings(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0, top_k=0,
                                merge=False)  # adapters off: nothing to fold
    limit = teacher_prompt_limit(None, model_config, cfg.max_new_tokens)

    def warn(_message: str) -> None:
        log(f"warning: a user-simulator prompt is longer than the {limit} tokens the model's context leaves for the "
            "follow-up; its conversation, reply and logged follow-up are cut in the middle to fit")

    encoder = TeacherPromptEncoder(tokenizer, limit, warn=warn)

    def simulate(prompts) -> list[str]:
        if not prompts:
            return []
        ids = [encoder.encode(p) for p in prompts]
        with active_adapters(model, []):
            written = sample(ids, settings)
        return tokenizer.batch_decode(written, skip_special_tokens=True)

    signal.set_user_simulator(simulate)
    return True
