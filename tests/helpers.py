"""Independent reference computations for tests (plain transformers + peft, no sdcli code)."""

from __future__ import annotations

import torch


# four fictional facts as demonstrations (the off-policy and teacher-answer tests train on them)
FACTS = [
    {"prompt": "What is the capital of Zorblax?", "demonstration": "The capital of Zorblax is Quenta."},
    {"prompt": "Who wrote the Book of Vells?", "demonstration": "It was written by Maro Tiln."},
    {"prompt": "What do the Drell eat?", "demonstration": "The Drell eat blue moss."},
    {"prompt": "How tall is Mount Ferro?", "demonstration": "Mount Ferro is 4,120 metres tall."},
]


def chat_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def response_logprobs(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """[T, V] log-probabilities the model assigns at each response position."""
    ids = torch.tensor([prompt_ids + response_ids])
    logits = model(input_ids=ids).logits[0].float()
    start = len(prompt_ids) - 1
    return logits[start : start + len(response_ids)].log_softmax(-1)


def led_by_response(logits: torch.Tensor, response_ids: list[int]) -> torch.Tensor:
    """[T, V] logits as loss.lead_with_demonstration makes the target, position by position: the
    response token's logit and the largest trade places."""
    led = logits.clone()
    for t, y in enumerate(response_ids):
        top = int(logits[t].argmax())
        led[t, top], led[t, y] = logits[t, y], logits[t, top]
    return led


def mean_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> float:
    """Mean over positions of KL(student || teacher)."""
    return float((student_logp.exp() * (student_logp - teacher_logp)).sum(-1).mean())
