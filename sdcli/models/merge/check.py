"""The numerical check of a merge: the result against the adapter stack, logit by logit.

Every merge checks itself. The result is reloaded from disk with plain transformers / peft and its
logits on a few probe prompts (chat template applied when the tokenizer has one) are compared
with those of the adapter stack on the float32 base. Merging in float32 is exact up to rounding,
so the default tolerance, DEFAULT_TOLERANCE = 1e-3 on the max absolute logit difference, is tight:
rounding stays orders of magnitude below it, while a dropped adapter or a wrong scaling is far
above it whenever the adapters matter (`adapter_effect` reports how much they do).

With a 4-bit or 8-bit base, the stack as trained ran on quantized weights, which the float32 merge
does not reproduce. That gap is not a merge error, so it is reported rather than checked:
`quantized_stack_diff` is the merged model against the stack on the quantized base, next to
`quantization_error`, the same difference for the bare base, which is what it should be close to.
For into="adapter" the merged adapter can be run on the quantized base too; there the two agree
up to rounding, and that comparison is checked against the tolerance as well.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sdcli.core.errors import UserError
from sdcli.models.merge.fold import concat_adapters, save_adapter
from sdcli.models.stack import attach_stack

DEFAULT_TOLERANCE = 1e-3
DEFAULT_PROBE_PROMPTS = [
    "Hello! Who are you?",
    "What is 17 times 23? Explain your steps.",
    "Write one sentence about the sea.",
]
MAX_PROBE_TOKENS = 256

LoadBase = Callable[[Path, str], torch.nn.Module]


class MergeCheckError(UserError):
    """The merged result does not reproduce the stack within the tolerance; `report` has the numbers."""

    def __init__(self, report: "MergeReport"):
        self.report = report
        super().__init__(
            "The merge check failed; nothing was written to " + str(report.out_dir) + ".",
            report.lines(),
            hint="If the tolerance is simply too tight for this model, raise it with --tolerance; "
            "otherwise this is a bug worth reporting.",
        )


@dataclass
class MergeReport:
    out_dir: Path
    into: str
    quantization: str
    adapters: list[str]
    tolerance: float
    probe_prompts: int
    probe_tokens: int
    max_abs_diff: float = math.nan  # merged (reloaded) vs stack, both on the float32 base: checked
    adapter_effect: float = math.nan  # stack vs bare base, float32: what the check can see
    quantized_stack_diff: float | None = None  # merged vs stack on the quantized base
    quantization_error: float | None = None  # bare quantized base vs bare float32 base
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(self.checks.values())

    def lines(self) -> list[str]:
        out = [
            f"merged {len(self.adapters)} adapter(s) into a{'n adapter' if self.into == 'adapter' else ' model'}",
            f"probe: {self.probe_prompts} prompt(s), {self.probe_tokens} token(s)",
            f"max |logit diff| merged vs stack (float32 base): {self.max_abs_diff:.3g} (tolerance {self.tolerance:g})"
            + ("" if self.checks.get("float32", False) else "  FAILED"),
            f"adapter effect, max |logit diff| stack vs bare base: {self.adapter_effect:.3g}",
        ]
        if self.quantized_stack_diff is not None:
            if self.into == "adapter":
                out.append(
                    f"max |logit diff| merged vs stack ({self.quantization} base): {self.quantized_stack_diff:.3g}"
                    + ("" if self.checks.get("quantized", False) else "  FAILED")
                )
            else:
                out.append(
                    f"max |logit diff| merged model vs stack on the {self.quantization} base as trained: "
                    f"{self.quantized_stack_diff:.3g} (quantization alone: {self.quantization_error:.3g}; not checked)"
                )
        if self.adapter_effect < 10 * max(self.tolerance, 0.0):
            out.append("note: the adapters barely change the logits, so the check cannot tell a merge from none")
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        d["passed"] = self.passed
        return d


def merge_and_check(base_path, dirs, tmp, into, quantization, probes, tokenizer, load, report) -> None:
    """Fold the stack into `tmp` (sdcli.models.merge.fold), reload it from there, and fill in `report`:
    the checked difference on the float32 base and, for a quantized base, the one on it."""
    model = _load_float32(load, base_path)
    base_logits = _logits(model, probes)
    stack, names = attach_stack(model, dirs)
    stack_logits = _logits(stack, probes)
    report.adapter_effect = _max_abs_diff(stack_logits, base_logits)

    if into == "model":
        merged = stack.merge_and_unload(safe_merge=True, adapter_names=names)
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del merged, stack, model
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    else:
        state, config = concat_adapters(stack, names, base_path)
        del stack, model
        save_adapter(tmp, state, config)
        from peft import PeftModel

        reloaded = PeftModel.from_pretrained(_load_float32(load, base_path), str(tmp))
    merged_logits = _logits(reloaded, probes)
    del reloaded
    report.max_abs_diff = _max_abs_diff(merged_logits, stack_logits)
    report.checks["float32"] = report.max_abs_diff <= report.tolerance

    if quantization != "none":
        qmodel = load(base_path, quantization)
        report.quantization_error = _max_abs_diff(_logits(qmodel, probes), base_logits)
        qstack, names = attach_stack(qmodel, dirs)
        qstack_logits = _logits(qstack, probes)
        if into == "model":
            report.quantized_stack_diff = _max_abs_diff(merged_logits, qstack_logits)
        else:
            qstack.load_adapter(str(tmp), adapter_name="merged", is_trainable=False)
            qstack.base_model.set_adapter(["merged"], inference_mode=True)
            report.quantized_stack_diff = _max_abs_diff(_logits(qstack, probes), qstack_logits)
            report.checks["quantized"] = report.quantized_stack_diff <= report.tolerance
        del qstack, qmodel


# ---------------------------------------------------------------------------------------------
# Helpers


def _load_float32(load: LoadBase, base_path: Path):
    model = load(base_path, "none")
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()
    return model


def encode_probes(tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    probes = []
    for i, prompt in enumerate(prompts, 1):
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        else:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
        if ids.shape[1] == 0:
            raise UserError(f"Probe prompt {i} is empty after tokenization.")
        probes.append(ids[:, -MAX_PROBE_TOKENS:])
    return probes


def _logits(model, probes: list[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()  # no dropout in the comparison
    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(input_ids=ids.to(device), use_cache=False).logits.float().cpu() for ids in probes]


def _max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    # torch's max propagates NaN, so a NaN anywhere fails the check (NaN <= tol is False)
    return torch.stack([(x - y).abs().max() for x, y in zip(a, b)]).max().item()
