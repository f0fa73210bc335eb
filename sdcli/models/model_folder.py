"""Checking a model folder without loading its weights.

`sd validate`, and every command before it loads a base model, checks the folder from its small
files and the headers of its weight files only:

- `config.json` is readable JSON (UTF-8) and its `model_type` is one transformers can build as a
  causal language model (or the folder ships its own code, with `model.trust_remote_code`);
- the weights are there: `model.safetensors`, a sharded `model.safetensors.index.json` with every
  shard it names, or `pytorch_model.bin` (sharded or not);
- each safetensors file is whole: its header parses, and the file is exactly as long as the
  header's offsets say (a copy cut short, or a download that stopped, is shorter);
- `lora.target_modules`, when it is a list, names modules the weights have. A name matches a
  module the way peft matches it: the module's name is the target, or ends with "." + target.

Reading a header costs a few kilobytes whatever the model's size, so a folder of many gigabytes is
checked in milliseconds. A `pytorch_model.bin` can only be checked for being a whole zip archive;
its tensor names are not read (that would load it), so target modules are not checked there.
"""

from __future__ import annotations

import difflib
import json
import struct
import zipfile
from pathlib import Path

from sdcli.core.errors import UserError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


def model_folder_problems(
    folder: Path | str, target_modules: list[str] | str | None = None, trust_remote_code: bool | None = False,
    key: str = "model.name_or_path",
) -> list[str]:
    """Everything wrong with `folder` as a base model, one line each; [] when it looks loadable.
    `trust_remote_code` None: not known here, so a folder that ships its own model code passes."""
    folder_problems, target_problems = _problems(Path(folder), target_modules, trust_remote_code, key)
    return folder_problems + target_problems


def check_model_folder(
    folder: Path | str, target_modules: list[str] | str | None = None, trust_remote_code: bool | None = False,
    key: str = "model.name_or_path",
) -> None:
    """Raise UserError listing what is wrong with `folder` as a base model (see the module docstring)."""
    folder_problems, target_problems = _problems(Path(folder), target_modules, trust_remote_code, key)
    if folder_problems:
        raise UserError(
            f"The model folder {folder} cannot be used:", folder_problems + target_problems,
            hint="sd never downloads models: point model.name_or_path at a complete local folder "
            "(config.json, tokenizer and weights), for example one saved with save_pretrained.",
        )
    if target_problems:
        raise UserError("'lora.target_modules' names modules the model does not have:", target_problems,
                        hint="Use names from the list above, or lora.target_modules: all-linear.")


def _problems(folder: Path, target_modules, trust_remote_code: bool | None, key: str) -> tuple[list[str], list[str]]:
    if not folder.is_dir():
        return [f"'{key}': {folder} is not a folder" + (" (it is a file)" if folder.exists() else "")], []
    problems = _config_problems(folder, trust_remote_code, key)
    weight_problems, tensors = _weights(folder)
    targets = (target_module_problems(target_modules, tensors, folder)
               if isinstance(target_modules, list) and tensors is not None else [])
    return problems + weight_problems, targets


# ---------------------------------------------------------------------------------------------
# config.json


def _config_problems(folder: Path, trust_remote_code: bool | None, key: str) -> list[str]:
    path = folder / "config.json"
    if not path.is_file():
        return [f"'{key}': {folder} has no config.json, so it is not a transformers model folder"]
    try:
        text = path.read_bytes().decode("utf-8-sig")
        config = json.loads(text)
    except OSError as e:
        return [f"{path}: cannot be read ({e.strerror or e})"]
    except UnicodeDecodeError as e:
        return [f"{path}: not valid UTF-8 (byte at offset {e.start})"]
    except json.JSONDecodeError as e:
        return [f"{path}:{e.lineno}: not valid JSON ({e.msg}); the file may be cut short"]
    except RecursionError:
        return [f"{path}: nested too deeply to read"]
    if not isinstance(config, dict):
        return [f"{path}: expected a JSON object, got {type(config).__name__}"]
    model_type = config.get("model_type")
    if trust_remote_code is not False and isinstance(config.get("auto_map"), dict):
        return []  # the folder ships its own model code
    if not isinstance(model_type, str) or not model_type:
        return [f"{path}: no 'model_type' (which architecture this is); a transformers config.json has one, e.g. \"llama\""]
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING_NAMES), n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        remote = (" The folder's config has an auto_map: with model.trust_remote_code=true its own code is used."
                  if isinstance(config.get("auto_map"), dict) else "")
        return [f"{path}: model_type {model_type!r} is not known to transformers {transformers.__version__}{hint}; "
                f"a newer transformers may know it.{remote}"]
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return [f"{path}: model_type {model_type!r} is not a causal language model (text generation), which sd trains"]
    return []


# ---------------------------------------------------------------------------------------------
# Weights


def _weights(folder: Path) -> tuple[list[str], dict[str, list[int]] | None]:
    """(problems, {tensor name: shape} from the safetensors headers, or None when not known)."""
    if (folder / SAFETENSORS_INDEX).is_file():
        return _sharded(folder, folder / SAFETENSORS_INDEX)
    if (folder / SAFETENSORS).is_file():
        problems, tensors = safetensors_header(folder / SAFETENSORS)
        return problems, tensors
    if (folder / TORCH_BIN_INDEX).is_file():
        return _sharded(folder, folder / TORCH_BIN_INDEX)
    if (folder / TORCH_BIN).is_file():
        return _torch_bin_problems(folder / TORCH_BIN), None
    others = sorted(p.name for p in folder.glob("*.safetensors")) + sorted(p.name for p in folder.glob("*.gguf"))
    found = f" (found {', '.join(others[:5])}, which transformers does not load by that name)" if others else ""
    return [f"{folder} has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX} with its shards, or {TORCH_BIN}{found}"], None


def _sharded(folder: Path, index_path: Path) -> tuple[list[str], dict[str, list[int]] | None]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError, AttributeError) as e:
        return [f"{index_path}: not a readable shard index ({type(e).__name__}: {e})"], None
    problems: list[str] = []
    tensors: dict[str, list[int]] | None = {}
    for shard in shards:
        path = folder / str(shard)
        if not path.is_file():
            problems.append(f"{index_path.name} names the shard {shard}, which is missing from {folder}")
            tensors = None
        elif path.suffix == ".safetensors":
            shard_problems, shard_tensors = safetensors_header(path)
            problems += shard_problems
            if tensors is not None and shard_tensors is not None:
                tensors.update(shard_tensors)
            else:
                tensors = None
        else:
            problems += _torch_bin_problems(path)
            tensors = None
    if tensors is None and not problems:  # .bin shards: the index still has every tensor's name
        tensors = {str(name): [] for name in weight_map}
    return problems, tensors


def safetensors_header(path: Path) -> tuple[list[str], dict[str, list[int]] | None]:
    """(problems, {tensor name: shape}) from a safetensors file's header, checked against its size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                return [f"{path}: truncated ({size} bytes; a safetensors file starts with an 8-byte header length)"], None
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                return [f"{path}: truncated or not a safetensors file (its header length says {header_len:,} bytes, "
                        f"the file has {size:,})"], None
            header = json.loads(f.read(header_len).decode("utf-8"))
    except OSError as e:
        return [f"{path}: cannot be read ({e.strerror or e})"], None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        return [f"{path}: the header is not valid JSON ({type(e).__name__}); the file is damaged"], None
    if not isinstance(header, dict):
        return [f"{path}: the header is not a JSON object; the file is damaged"], None
    end = 0
    tensors: dict[str, list[int]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            tensors[name] = list(info.get("shape", []))
            end = max(end, int(stop))
        except (TypeError, KeyError, ValueError):
            return [f"{path}: tensor {name!r} has no valid data_offsets in the header; the file is damaged"], None
    expected = 8 + header_len + end
    if size < expected:
        return [f"{path}: truncated: its header says the file is {expected:,} bytes long, it has {size:,} "
                "(a copy or download that stopped early?)"], None
    if size > expected:
        return [f"{path}: {size - expected:,} bytes longer than its header says ({expected:,}); the file is damaged"], None
    return [], tensors


def _torch_bin_problems(path: Path) -> list[str]:
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
    except OSError as e:
        return [f"{path}: cannot be read ({e.strerror or e})"]
    if magic == b"PK" and not zipfile.is_zipfile(path):
        return [f"{path}: truncated (the zip archive torch writes has no end record)"]
    if magic not in (b"PK", b"\x80\x02"):
        return [f"{path}: not a torch checkpoint (neither a zip archive nor a pickle)"]
    return []


# ---------------------------------------------------------------------------------------------
# Target modules


def target_module_problems(targets: list[str], tensors: dict[str, list[int]], where: Path | str) -> list[str]:
    """One line per name in `targets` that matches no module holding a weight in `tensors`."""
    modules = {name.rsplit(".", 1)[0] for name in tensors if "." in name}
    return module_name_problems(targets, modules, linear={m.rsplit(".", 1)[0] for m, shape in tensors.items()
                                                           if m.endswith(".weight") and len(shape) == 2}, where=where)


def module_name_problems(targets: list[str], modules: set[str], linear: set[str] | None = None,
                         where: Path | str = "the model") -> list[str]:
    """`targets` that match none of `modules` (peft's rule: equal, or a suffix after a dot)."""
    problems = []
    leaves = sorted({m.rsplit(".", 1)[-1] for m in (linear if linear else modules)})
    for target in targets:
        if any(m == target or m.endswith("." + target) for m in modules):
            continue
        close = difflib.get_close_matches(target.rsplit(".", 1)[-1], leaves, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        problems.append(
            f"'lora.target_modules': {target!r} matches no module of {where}{hint}; the modules with "
            f"{'weight matrices' if linear else 'weights'} there are named: {', '.join(leaves[:20])}"
        )
    return problems
