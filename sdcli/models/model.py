"""Loading the base model (optionally quantized), attaching LoRA adapters, and fast sampling weights.

One copy of the base weights is ever in memory. The student is base + (earlier episodes' adapters,
frozen) + this episode's adapter; the teacher is the same module with this episode's adapter
switched off (see training/teacher.py).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from sdcli.core.errors import UserError
from sdcli.recipe.sections import BUILTIN_MODEL, DType, LoraSettings, ModelConfig, Quantization

# At import, not in load_base: huggingface_hub reads these once, when transformers is first
# imported, and a library user may import sd before anything else. A value the user set wins.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def quiet_transformers() -> None:
    """Our own progress and logs are enough; library progress bars and deprecation notes are noise."""
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")


def resolve_model_path(name_or_path: str, trust_remote_code: bool | None = None) -> Path:
    """The folder of the base model, checked from its config and weight headers before anything
    loads it (`sdcli.models.model_folder`): a missing or truncated weight file, or an architecture
    transformers does not know, is a UserError naming the file, not a loader's traceback."""
    if name_or_path == BUILTIN_MODEL:
        from sdcli.models.builtin_model import ensure_builtin_model

        return ensure_builtin_model()
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise UserError(
            f"model.name_or_path: {path} is not a model folder (no config.json).",
            hint=f"sd never downloads models. Point it at a local folder, or use {BUILTIN_MODEL}.",
        )
    from sdcli.models.model_folder import check_model_folder

    check_model_folder(path, trust_remote_code=trust_remote_code)
    return path


def resolve_dtype(dtype: DType, device: torch.device) -> torch.dtype:
    if dtype is DType.auto:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # bf16 matmuls are ~20x slower than fp32 on common CPUs
    return {DType.float32: torch.float32, DType.bfloat16: torch.bfloat16, DType.float16: torch.float16}[dtype]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    path: Path
    dtype: torch.dtype
    device: torch.device
    quantized: bool


def load_tokenizer(path: Path, require_chat_template: bool = True):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if require_chat_template and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"The tokenizer in {path} has no chat template, and sd builds prompts as chat messages.",
            hint="Use an instruct/chat model, or add a 'chat_template' to its tokenizer_config.json.",
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(cfg: ModelConfig, device: torch.device | None = None) -> LoadedModel:
    """Load the base model frozen, in eval mode (no dropout in either role)."""
    from sdcli.models.quantization import load_model

    quiet_transformers()
    device = device or default_device()
    path = resolve_model_path(cfg.name_or_path, cfg.trust_remote_code).resolve()
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(path)
    kwargs: dict = dict(trust_remote_code=cfg.trust_remote_code)
    quantized = cfg.quantization is not Quantization.none
    if quantized:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise UserError(f"model.quantization={cfg.quantization.value} needs bitsandbytes: {e}", hint="pip install bitsandbytes") from None
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
        if device.type == "cpu":
            import warnings

            warnings.warn(
                f"model.quantization={cfg.quantization.value} on a CPU: bitsandbytes runs it with its CPU kernels, "
                "which saves memory but is several times slower than float32 here. It is meant for CUDA.",
                stacklevel=2,
            )
    # quantized exactly as `sd merge` reloads it (sdcli.models.quantization)
    model = load_model(path, cfg.quantization, dtype, **kwargs)
    if not quantized:
        model.to(device)
    model.requires_grad_(False)
    model.eval()
    model.config.use_cache = True
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, dtype=dtype, device=device, quantized=quantized)


def lora_config(settings: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )


def add_trainable_adapter(model, name: str, settings: LoraSettings):
    """Add this episode's adapter on top of whatever is attached. Returns the PeftModel."""
    from peft import PeftModel, get_peft_model

    from sdcli.models.stack import set_active_adapters

    check_target_modules(model, settings)
    if isinstance(model, PeftModel):
        earlier = list(model.base_model.active_adapters)
        model.add_adapter(name, lora_config(settings))
        set_active_adapters(model, [*earlier, name], trainable=[name])
    else:
        model = get_peft_model(model, lora_config(settings), adapter_name=name)
        for pname, param in model.named_parameters():
            param.requires_grad_(f".{name}." in pname and "lora_" in pname)
    return model


def base_model(model) -> torch.nn.Module:
    """The transformers model itself: under peft's wrapper, or the model when there is none."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_target_modules(model, settings: LoraSettings) -> None:
    """UserError naming `lora.target_modules` entries that match no module of the loaded model
    (peft raises a ValueError for none matching, and says nothing when only some do)."""
    if not isinstance(settings.target_modules, list):
        return
    from sdcli.models.model_folder import module_name_problems

    base = base_model(model)
    modules = {name for name, _ in base.named_modules() if name}
    linear = {name for name, m in base.named_modules()
              if isinstance(m, torch.nn.Linear) and ".lora_" not in name and not name.endswith(".base_layer")}
    problems = module_name_problems(settings.target_modules, modules, linear, where="the model")
    if problems:
        raise UserError("'lora.target_modules' names modules the model does not have:", problems,
                        hint="Use names from the list above, or lora.target_modules: all-linear.")


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextmanager
def merged_for_sampling(model, enabled: bool):
    """Sample with the active adapters folded into the weights: one matmul per linear, not three.

    The folded weights are new tensors swapped in for the duration; the original tensors are put
    back untouched afterwards, so the base weights are bit-for-bit unchanged (an in-place
    merge + unmerge would leave rounding drift in them after every step).
    """
    if not enabled:
        yield
        return
    layers = [(layer, layer.get_base_layer()) for layer in lora_layers(model)]
    # Adapters switched off (peft's disable_adapter(); active_adapters(model, []) in sdcli.models.stack)
    # are still listed as active: folding them would put them back, and the block below, leaving its
    # own adapter-off context, would switch them on for the caller's. Such a layer folds nothing.
    active = [(layer, base, [a for a in layer.active_adapters if a in layer.lora_A])
              for layer, base in layers if not layer.disable_adapters]
    active = [(layer, base, names) for layer, base, names in active if names]
    if not active:  # the bare base, or nothing to fold: sample as the model is
        yield
        return
    # quantized weights (int8 / packed 4-bit) cannot take a float delta; then fold nothing, since
    # the adapters are switched off while folded and an unfolded layer would lose its adapter
    if not all(getattr(base, "weight", None) is not None and base.weight.dtype.is_floating_point for _, base, _ in active):
        yield
        return
    swapped: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for layer, base, names in active:
                original = base.weight.data
                delta = sum(layer.get_delta_weight(a) for a in names)
                swapped.append((base.weight, original))
                base.weight.data = original + delta.to(original.dtype)
        from sdcli.models.stack import active_adapters

        with active_adapters(model, []):  # the folded weights already hold the adapters
            yield
    finally:
        for param, original in swapped:
            param.data = original


def student_train_mode(model, adapter: str) -> None:
    """Training mode for the student, and no wider: every module in eval mode except the LoRA
    dropout of `adapter`, the one being trained.

    `model.train()` would also switch on the base model's own dropout (attention, residual), which
    the user never asked for and which makes the student a noisier network than the teacher it is
    compared with; frozen adapters have none (`sdcli.models.stack`), and the teacher runs in
    `eval_mode`.
    """
    model.eval()
    for layer in lora_layers(model):
        if adapter in layer.lora_dropout:
            layer.lora_dropout[adapter].train()


@contextmanager
def eval_mode(model):
    """Every module in eval mode inside the block; afterwards each one is put back as it was
    (`model.train(was_training)` would set every module to the mode of the top one)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode
