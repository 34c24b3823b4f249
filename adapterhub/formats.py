"""On-disk formats, read without torch: safetensors headers, base-model shapes, PEFT adapters.

Design decisions:
- The registry validates every import against the registered base model, and importing the
  registry must not import torch (DESIGN.md), so everything here parses headers and JSON only.
  A safetensors header is 8 bytes of little-endian length followed by JSON; reading it costs
  microseconds whatever the size of the file.
- The safetensors library is the authority on a file's layout: `read_safetensors_header` lets
  its parser (Rust, `safe_open`) check the header first, so what the registry accepts is exactly
  what `safetensors.load_file` loads later: offsets that are integers, tile the data region in
  order with no overlap and no gap and end at the end of the file, shapes of non-negative
  integers, spans of dtype size × elements, no nesting. Its message is kept and, where it does
  not name the tensor, the tensor is found and named here. Only what the library allows and
  adapterhub's readers do not (dtypes outside `_DTYPE_BYTES`) is checked by hand.
- What import parses is capped before it is parsed: a config file at 1 MiB (real ones are a
  few KB; a 30 MB config of 2M objects took 1.1 GB), a safetensors header at 8 MiB (≈60,000
  tensors; a LoRA on every linear layer of a 70B model needs ≈150 KB), JSON at 32 levels of
  nesting (PEFT and transformers configs use under 6), and every number in a config finite
  (NaN or 1e309 in `lora_alpha` would make every request to the adapter fail).
- An adapter or model directory is read as a set of regular files (`directory_files`): a
  symbolic link is followed only when it resolves to a regular file inside the directory (a
  checkpoint that points at a sibling's weights), or, in a Hugging Face cache snapshot, inside
  that repository's `blobs/` (where the cache keeps the files its snapshots link to); one that
  leads anywhere else (`/etc/passwd`, `/proc/self/environ`), dangles, or names a directory, and
  any FIFO, socket or device, is refused by name, so nothing from outside is ever stored,
  exported or pushed. Pickled extra files (`training_args.bin`, `optimizer.pt`, `*.pkl`, or any file
  that starts like a pickle or is a torch zip archive) are left out and reported as skipped:
  unpickling runs code, and the registry never hands out a pickle.
- The PEFT on-disk format (`adapter_config.json` + `adapter_model.safetensors`) is the
  interchange format; the kinds the registry can check are those of the kinds table
  (`adapterhub.kinds`), spelled as PEFT writes them (PEFT cannot load `"lora"`). A directory
  with `config.json` and `*.safetensors` weights instead is a *full model* (full or layer-wise
  fine-tuning, a merged model): it is stored the same way, with `peft_type` "FULL", so lineage,
  evaluations and serving treat both alike.
- What to check is looked up, not branched on: a kind's `TensorNaming` says how its tensors
  are named and shaped, and the checks run per layout (`_BASE_CHECKS`); which modules a config
  adapts, and each module's rank, follow PEFT's rules as `adapterhub.kinds` implements them once.
  A regex in a config that backtracks catastrophically is one problem naming it, not a hang.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
import sys
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from adapterhub.errors import ValidationError
from adapterhub.kinds import (
    FULL_MODEL_PEFT_TYPE,
    PEFT_MODEL_PREFIX,
    AdapterKind,
    PatternError,
    TensorPart,
    UnknownKindError,
    feedforward_matcher,
    kind_of,
    layers_pattern_regex,
    lora_alpha,
    lora_rank,
    modules_to_save_regex,
    pattern_key_regex,
    peft_types,
    regex_problem,
    target_matcher,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Suffixes of files that are pickles whatever their content (plus `_looks_pickled` on content).
PICKLE_SUFFIXES = PICKLED_WEIGHT_SUFFIXES + (".pickle", ".joblib", ".dill")
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
MAX_CONFIG_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 8 * 1024 * 1024
MAX_JSON_DEPTH = 32
# Integer columns are 32-bit on PostgreSQL; a rank anywhere near this fits no real matrix anyway.
_MAX_RANK = 2**31 - 1
# The registry's task_type column holds 64 characters; PEFT's task types are short names.
_MAX_TASK_TYPE_CHARS = 64

# Config keys that name the run, not the model: left out of the fingerprint so the same
# weights saved by another transformers version or dtype label keep their identity.
_FINGERPRINT_IGNORED_CONFIG_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache"}


@dataclass(frozen=True)
class TensorInfo:
    """Name-independent facts about one stored tensor.

    `byte_range` is where its data lies in the file (absolute offsets, end exclusive), so the
    merge reader and the server's memory map read a tensor without parsing the header again.
    It is not part of equality: two files holding the same tensor agree on what it is.
    """

    dtype: str
    shape: tuple[int, ...]
    byte_range: tuple[int, int] = field(default=(0, 0), compare=False)


def _cap_text(size: int) -> str:
    return f"{size // 2**20} MiB" if size % 2**20 == 0 else f"{size:,} bytes"


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor infos of one safetensors file; raises ValueError naming what is wrong with it.

    The header is checked by the safetensors library before Python parses it (see the module
    docstring), so a header that reaches `json.loads` is flat and well typed.
    """
    size = path.stat().st_size
    if size < 8:
        raise ValueError(f"{path.name} is empty or truncated ({size} bytes)")
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > size - 8:
            raise ValueError(f"{path.name} is truncated or not safetensors (header of {header_len} bytes in a {size}-byte file)")
        if header_len > MAX_HEADER_BYTES:
            raise ValueError(
                f"{path.name} has a safetensors header of {header_len:,} bytes; adapterhub reads headers "
                f"of at most {_cap_text(MAX_HEADER_BYTES)} (about 60,000 tensors)"
            )
        raw = handle.read(header_len)
    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except SafetensorError as exc:
        raise ValueError(_library_problem(path.name, str(exc), raw, size - 8 - header_len)) from None
    header = json.loads(raw)
    tensors: dict[str, TensorInfo] = {}
    data_start = 8 + header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if dtype not in _DTYPE_BYTES:
            raise ValueError(f"{path.name}: tensor {name!r} has dtype {dtype}, which adapterhub does not read ({', '.join(_DTYPE_BYTES)})")
        tensors[name] = TensorInfo(dtype=dtype, shape=shape, byte_range=(data_start + begin, data_start + end))
    return tensors


def _library_problem(file_name: str, message: str, raw: bytes, data_len: int) -> str:
    """The safetensors library's complaint as one line, naming the tensor where it does not.

    Only called after the library refused the file. Its two messages without a tensor name
    (a span that is not dtype × shape, data that does not end at the end of the file) come
    after it parsed the header into flat, typed entries, so Python can parse it to say more.
    """
    message = message.removeprefix("Error while deserializing header: ")
    if message.startswith("invalid offset for tensor"):
        name = message.removeprefix("invalid offset for tensor").strip(" `")
        return (f"{file_name}: tensor {name!r} has data_offsets that overlap another tensor, leave a gap or run "
                "backwards (the tensors must tile the data region in order)")
    if message.startswith(("invalid shape, data type, or offset", "incomplete metadata")):
        try:
            entries = {k: v for k, v in json.loads(raw).items() if k != "__metadata__"}
            spans = {k: (v["data_offsets"][1] - v["data_offsets"][0], v["dtype"], v["shape"]) for k, v in entries.items()}
            data_end = max((v["data_offsets"][1] for v in entries.values()), default=0)
        except (ValueError, RecursionError, TypeError, KeyError, IndexError, AttributeError):
            return f"{file_name} is not valid safetensors: {message}"
        for name, (span, dtype, shape) in spans.items():
            expected = _DTYPE_BYTES.get(dtype)
            if expected is not None and span != expected * math.prod(shape):
                return (f"{file_name}: tensor {name!r} spans {span} bytes, but {dtype} {list(shape)} needs "
                        f"{expected * math.prod(shape)}")
        if data_end > data_len:
            return f"{file_name} is truncated: tensors need {data_end} data bytes, the file has {data_len}"
        if data_end < data_len:
            return f"{file_name} has {data_len - data_end} bytes after its last tensor (the tensors must end at the end of the file)"
    return f"{file_name} is not valid safetensors: {message}"


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory, in a stable order."""
    return sorted(p for p in model_dir.glob("*.safetensors") if p.is_file())


@dataclass(frozen=True)
class BaseModelSpec:
    """What an adapter must fit: the architecture and the shape of every weight.

    `module_shapes` maps a module path (`model.layers.0.self_attn.q_proj`) to the shape of its
    `.weight`; other parameters (biases, norms) are in `param_shapes` under their full names.
    """

    architecture: str
    model_type: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    module_shapes: Mapping[str, tuple[int, ...]]
    param_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // max(self.num_attention_heads, 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "vocab_size": self.vocab_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "module_shapes": {k: list(v) for k, v in self.module_shapes.items()},
            "param_shapes": {k: list(v) for k, v in self.param_shapes.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BaseModelSpec:
        return cls(
            architecture=data["architecture"],
            model_type=data["model_type"],
            hidden_size=int(data["hidden_size"]),
            num_layers=int(data["num_layers"]),
            vocab_size=int(data["vocab_size"]),
            num_attention_heads=int(data["num_attention_heads"]),
            num_key_value_heads=int(data["num_key_value_heads"]),
            module_shapes={k: tuple(v) for k, v in data["module_shapes"].items()},
            param_shapes={k: tuple(v) for k, v in data.get("param_shapes", {}).items()},
        )


def parse_json_file(path: Path, *, max_bytes: int = MAX_CONFIG_BYTES) -> tuple[Any, list[str]]:
    """A JSON file's content and every problem with it (None and the problems when unreadable).

    The size cap is checked before the file is read, nesting and non-finite numbers after it
    parsed; a problem names the file, and the key path of a bad number.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        return None, [f"{path.name} is missing in {path.parent}"]
    if not stat.S_ISREG(info.st_mode):
        return None, [f"{path.name} is not a regular file"]
    if info.st_size > max_bytes:
        return None, [f"{path.name} is {info.st_size:,} bytes; adapterhub reads config files of at most {_cap_text(max_bytes)}"]
    try:
        data = json.loads(path.read_bytes())
    except RecursionError:
        return None, [f"{path.name} is nested too deeply (at most {MAX_JSON_DEPTH} levels)"]
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, and integers of over 4300 digits
        return None, [f"{path.name} does not parse as JSON: {exc}"]
    return data, _json_problems(path.name, data)


def _json_problems(file_name: str, data: Any) -> list[str]:
    """Nesting beyond MAX_JSON_DEPTH and non-finite numbers (NaN, Infinity, 1e309), walked without recursion."""
    problems: list[str] = []
    stack: list[tuple[str, Any, int]] = [("", data, 1)]
    while stack:
        key_path, value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return [f"{file_name} is nested more than {MAX_JSON_DEPTH} levels deep"]
            if isinstance(value, dict):
                stack.extend((f"{key_path}.{key}" if key_path else key, child, depth + 1) for key, child in value.items())
            else:
                stack.extend((f"{key_path}[{i}]", child, depth + 1) for i, child in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{key_path or file_name!r} is {value} in {file_name}; numbers must be finite")
    return sorted(problems)


def _load_json(path: Path, what: str) -> dict[str, Any]:
    data, problems = parse_json_file(path)
    if not problems and not isinstance(data, dict):
        problems = [f"{path.name} is not a JSON object"]
    if problems:
        raise ValidationError(what, problems)
    return data


def model_tensor_infos(model_dir: Path) -> dict[str, TensorInfo]:
    """All tensors of a full-model directory (every safetensors shard)."""
    problems: list[str] = []
    tensors: dict[str, TensorInfo] = {}
    files = weight_files(model_dir)
    if not files:
        pickled = [p.name for p in model_dir.iterdir() if p.suffix in PICKLED_WEIGHT_SUFFIXES]
        hint = f" (found pickled {', '.join(pickled)}: convert to safetensors)" if pickled else ""
        raise ValidationError(f"model {model_dir}", [f"no *.safetensors weights{hint}"])
    for path in files:
        try:
            tensors.update(read_safetensors_header(path))
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ValidationError(f"model {model_dir}", problems)
    return tensors


_MODEL_INT_KEYS = ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "num_key_value_heads")


def model_config_problems(config: Mapping[str, Any]) -> list[str]:
    """Type problems of the transformers `config.json` fields adapterhub reads (empty when fine)."""
    problems: list[str] = []
    architectures = config.get("architectures")
    if architectures is not None and not (isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)):
        problems.append(f"config.json: 'architectures' must be a list of class names, got {architectures!r:.80}")
    if not isinstance(config.get("model_type", ""), str):
        problems.append(f"config.json: 'model_type' must be a string, got {config['model_type']!r:.80}")
    text_config = config.get("text_config")
    if text_config is not None and not isinstance(text_config, dict):
        problems.append(f"config.json: 'text_config' must be an object, got {text_config!r:.80}")
        text_config = None
    for key in _MODEL_INT_KEYS:
        value = (text_config or config).get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            problems.append(f"config.json: {key!r} must be a non-negative integer, got {value!r:.80}")
    return problems


def base_model_spec(model_dir: Path) -> BaseModelSpec:
    """Read a transformers model directory's config and weight shapes (no torch)."""
    config = _load_json(model_dir / "config.json", f"model {model_dir}")
    problems = model_config_problems(config)
    if problems:
        raise ValidationError(f"model {model_dir}", problems)
    tensors = model_tensor_infos(model_dir)
    text_config = config.get("text_config") or config
    module_shapes = {n.removesuffix(".weight"): t.shape for n, t in tensors.items() if n.endswith(".weight")}
    param_shapes = {n: t.shape for n, t in tensors.items() if not n.endswith(".weight")}
    heads = text_config.get("num_attention_heads") or 1
    return BaseModelSpec(
        architecture=(config.get("architectures") or ["unknown"])[0],
        model_type=config.get("model_type") or "unknown",
        hidden_size=text_config.get("hidden_size") or 0,
        num_layers=text_config.get("num_hidden_layers") or 0,
        vocab_size=text_config.get("vocab_size") or 0,
        num_attention_heads=heads,
        num_key_value_heads=text_config.get("num_key_value_heads") or heads,
        module_shapes=module_shapes,
        param_shapes=param_shapes,
    )


def fingerprint_config(config: Mapping[str, Any]) -> str:
    """Canonical JSON of the parts of a config that define the model."""
    kept = {k: v for k, v in config.items() if k not in _FINGERPRINT_IGNORED_CONFIG_KEYS}
    return json.dumps(kept, sort_keys=True, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------
# Adapters


@dataclass(frozen=True)
class AdapterManifest:
    """What an adapter directory holds, parsed and structurally checked, not yet against a base.

    `files` are the relative paths to store (regular files, or links to regular files inside
    the directory); `skipped` are the pickled extra files left out (see the module docstring).
    """

    path: Path
    peft_type: str
    config: Mapping[str, Any]
    tensors: Mapping[str, TensorInfo]
    files: tuple[str, ...]
    rank: int | None = None
    alpha: float | None = None
    target_modules: tuple[str, ...] = ()
    task_type: str | None = None
    skipped: tuple[str, ...] = ()

    @property
    def is_full_model(self) -> bool:
        return self.adapter_kind.is_full_model

    @property
    def adapter_kind(self) -> AdapterKind:
        """Its entry in the kinds table (naming, merge rule, backends)."""
        return kind_of(self.peft_type, self.config)

    @property
    def kind(self) -> str:
        """What a user calls it: `lora`, `dora`, `rslora`, `ia3`, `prompt_tuning`, … or `full`."""
        return self.adapter_kind.name


# ------------------------------------------------------------------ the files of a directory


@dataclass(frozen=True)
class DirectoryFiles:
    """The files of a directory adapterhub stores (`files`) and the pickles it leaves out (`skipped`)."""

    files: tuple[str, ...]
    skipped: tuple[str, ...]


def _looks_pickled(path: Path) -> bool:
    """Whether a file is a pickle by its name or its bytes (a protocol 2+ pickle, a torch zip archive).

    Safetensors files are never sniffed: their first bytes are a header length, which can
    read as a pickle's protocol marker.
    """
    if path.name.endswith(PICKLE_SUFFIXES):
        return True
    if path.name.endswith(".safetensors"):
        return False
    with path.open("rb") as handle:
        head = handle.read(4)
        if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO n ... STOP
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"."
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith((".pkl", "/data.pkl")) for name in archive.namelist())
        except (zipfile.BadZipFile, OSError, ValueError):
            return False
    return False


def link_roots(root: Path) -> tuple[Path, ...]:
    """Where a link inside `root` may resolve to: `root`, and for a Hugging Face cache snapshot
    (`models--org--name/snapshots/<revision>`, whose files are links to `../../blobs/<hash>`)
    that repository's own `blobs/`."""
    blobs = root.parent.parent / "blobs"
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--") and blobs.is_dir():
        return (root, blobs)
    return (root,)


def directory_files(path: Path) -> DirectoryFiles:
    """The regular files inside `path` (relative, sorted), refusing anything that leads outside it.

    A symbolic link is followed when it resolves (fully) to a regular file inside `path`, or
    inside the repository's `blobs/` when `path` is a Hugging Face cache snapshot; one that
    leads anywhere else, dangles, loops or names a directory, and any FIFO, socket or device,
    is refused, every one named in one `ValidationError`. Pickled files are left out and
    returned as `skipped`. Sub-directories are walked without following links.
    """
    root = path.resolve()
    if not root.is_dir():
        raise ValidationError(f"directory {path}", ["does not exist or is not a directory"])
    allowed = link_roots(root)
    problems: list[str] = []
    files: list[str] = []
    skipped: list[str] = []
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            problems.append(f"{Path(directory).relative_to(root).as_posix()}: cannot be listed ({exc.strerror})")
            continue
        for entry in entries:
            rel = Path(entry.path).relative_to(root).as_posix()
            if entry.is_symlink():
                try:
                    target = Path(entry.path).resolve(strict=True)
                except (OSError, RuntimeError):
                    problems.append(f"{rel} is a symbolic link that dangles or loops ({os.readlink(entry.path)})")
                    continue
                if not any(target.is_relative_to(allowed_root) for allowed_root in allowed):
                    problems.append(f"{rel} is a symbolic link to {target}, outside the directory (copy the file in instead)")
                    continue
                if not target.is_file():
                    problems.append(f"{rel} is a symbolic link to {'a directory' if target.is_dir() else 'something that is not a regular file'}")
                    continue
            elif entry.is_dir(follow_symlinks=False):
                pending.append(Path(entry.path))
                continue
            elif not entry.is_file(follow_symlinks=False):
                problems.append(f"{rel} is not a regular file (a FIFO, socket or device)")
                continue
            try:
                (skipped if _looks_pickled(Path(entry.path)) else files).append(rel)
            except OSError as exc:
                problems.append(f"{rel} cannot be read ({exc.strerror})")
    if problems:
        raise ValidationError(f"directory {path}", problems)
    return DirectoryFiles(files=tuple(sorted(files)), skipped=tuple(sorted(skipped)))


# ------------------------------------------------------------------ PEFT config fields


def target_names(config: Mapping[str, Any]) -> tuple[str, ...]:
    """`target_modules` as the registry stores it: the sorted names, or the one pattern."""
    targets = config.get("target_modules")
    return (targets,) if isinstance(targets, str) else tuple(sorted(targets or ()))


def _is_number(value: Any) -> bool:
    """A JSON number a float holds: floats (non-finite ones are `parse_json_file`'s to report), ints up to ~1.8e308."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, float) or abs(value) <= sys.float_info.max


def _is_count(value: Any, *, low: int = 1, high: int = _MAX_RANK) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _config_problems(config: Mapping[str, Any]) -> list[str]:
    """Every field of an adapter config that has the wrong type or range (empty when fine).

    Checks what adapterhub and PEFT read: the kind, rank and alpha, the module lists and
    patterns (valid regexes, as PEFT compiles them), the flags. Non-finite numbers are
    reported by `parse_json_file`, so a NaN alpha is one problem, not two.
    """
    problems: list[str] = []
    peft_type = config.get("peft_type")
    if peft_type is None or peft_type == "":
        problems.append(f"{ADAPTER_CONFIG} has no 'peft_type'")
    elif not isinstance(peft_type, str):
        problems.append(f"'peft_type' must be a string, got {peft_type!r:.80}")
    elif peft_type not in (known := peft_types(adapters_only=True)):
        spelled = f" (PEFT spells it {peft_type.upper()!r})" if peft_type.upper() in known else ""
        problems.append(f"'peft_type' {peft_type!r:.80} is not a kind the registry reads{spelled}; known: {', '.join(known)}")
    task_type = config.get("task_type")
    if task_type is not None and not (isinstance(task_type, str) and len(task_type) <= _MAX_TASK_TYPE_CHARS):
        problems.append(f"'task_type' must be a string of at most {_MAX_TASK_TYPE_CHARS} characters, got {task_type!r:.80}")
    r = config.get("r")
    if r is not None and not _is_count(r):
        problems.append(f"'r' must be a positive integer (at most {_MAX_RANK}), got {r!r:.80}")
    alpha = config.get("lora_alpha")
    if alpha is not None and not _is_number(alpha):
        problems.append(f"'lora_alpha' must be a number, got {alpha!r:.80}")
    for key in ("target_modules", "feedforward_modules", "exclude_modules"):
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            if (error := regex_problem(value)) is not None:
                problems.append(f"{key!r} {value!r:.80} is not a valid regular expression: {error}")
        elif not _is_str_list(value):
            problems.append(f"{key!r} must be a list of module names or a regex string, got {value!r:.80}")
    # PEFT puts these names into regexes of its own (`kinds.modules_to_save_regex`, `layers_pattern_regex`).
    modules_to_save = config.get("modules_to_save")
    if modules_to_save is not None and not _is_str_list(modules_to_save):
        problems.append(f"'modules_to_save' must be a list of module names, got {modules_to_save!r:.80}")
    elif modules_to_save:
        problems.extend(
            f"'modules_to_save' entry {name!r:.80} is not valid in a regular expression: {error}"
            for name in modules_to_save if (error := regex_problem(modules_to_save_regex(name))) is not None
        )
    layers = config.get("layers_to_transform")
    if layers is not None and not (_is_count(layers, low=0) or (isinstance(layers, list) and all(_is_count(i, low=0) for i in layers))):
        problems.append(f"'layers_to_transform' must be a layer index or a list of them, got {layers!r:.80}")
    layers_pattern = config.get("layers_pattern")
    if layers_pattern is not None and not (isinstance(layers_pattern, str) or _is_str_list(layers_pattern)):
        problems.append(f"'layers_pattern' must be a name or a list of names, got {layers_pattern!r:.80}")
    elif layers_pattern:
        problems.extend(
            f"'layers_pattern' {name!r:.80} is not valid in a regular expression: {error}"
            for name in ([layers_pattern] if isinstance(layers_pattern, str) else layers_pattern)
            if (error := regex_problem(layers_pattern_regex(name))) is not None
        )
    for key, valid, what in (("rank_pattern", _is_count, "positive integers"), ("alpha_pattern", _is_number, "numbers")):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            problems.append(f"{key!r} must be an object of module pattern → value, got {patterns!r:.80}")
            continue
        for pattern, value in patterns.items():
            if (error := regex_problem(pattern_key_regex(pattern))) is not None:
                problems.append(f"{key!r} key {pattern!r:.80} is not a valid regular expression: {error}")
            if not valid(value) and not (isinstance(value, float) and not math.isfinite(value)):
                problems.append(f"{key!r} values must be {what}, got {value!r:.80} for {pattern!r:.80}")
    for key in ("use_dora", "use_rslora", "fan_in_fan_out", "prefix_projection", "inference_mode"):
        value = config.get(key)
        if value is not None and not isinstance(value, bool):
            problems.append(f"{key!r} must be true or false, got {value!r:.80}")
    for key in ("num_virtual_tokens", "token_dim", "num_layers", "num_transformer_submodules"):
        value = config.get(key)
        if value is not None and not _is_count(value):
            problems.append(f"{key!r} must be a positive integer, got {value!r:.80}")
    return problems


# ------------------------------------------------------------------ reading a directory


def read_adapter_dir(path: Path) -> AdapterManifest:
    """Parse and structurally check a PEFT adapter or full-model directory.

    Raises one `ValidationError` listing every problem. Pickled weights are refused: loading
    them runs arbitrary code (the CLI offers a `weights_only` conversion before import).
    Nothing outside the directory is read (`directory_files`).
    """
    subject = f"adapter {path}"
    if not path.exists():
        raise ValidationError(subject, ["the directory does not exist"])
    if not path.is_dir():
        raise ValidationError(subject, ["not a directory (give the folder that holds adapter_config.json)"])
    listing = directory_files(path)
    if ADAPTER_CONFIG in listing.files:
        return _read_peft_dir(path, listing)
    if "config.json" in listing.files and any(f.endswith(".safetensors") and "/" not in f for f in listing.files):
        return _read_full_model_dir(path, listing)
    problems = [f"no {ADAPTER_CONFIG} (a PEFT adapter) and no config.json with *.safetensors (a full model)"]
    pickled = [f for f in listing.skipped if f.endswith(PICKLED_WEIGHT_SUFFIXES)]
    if pickled:
        problems.append(f"pickled weights {', '.join(pickled)} are refused; convert them to safetensors")
    raise ValidationError(subject, problems)


def _read_full_model_dir(path: Path, listing: DirectoryFiles) -> AdapterManifest:
    config = _load_json(path / "config.json", f"model {path}")
    problems = model_config_problems(config)
    if problems:
        raise ValidationError(f"model {path}", problems)
    tensors = model_tensor_infos(path)
    return AdapterManifest(
        path=path, peft_type=FULL_MODEL_PEFT_TYPE, config=config, tensors=tensors, files=listing.files,
        task_type=None, skipped=listing.skipped,
    )


def _read_peft_dir(path: Path, listing: DirectoryFiles) -> AdapterManifest:
    subject = f"adapter {path}"
    config, problems = parse_json_file(path / ADAPTER_CONFIG)
    if config is not None and not isinstance(config, dict):
        problems, config = [f"{ADAPTER_CONFIG} is not a JSON object"], None
    if config is None:
        raise ValidationError(subject, problems)
    problems += _config_problems(config)
    tensors: dict[str, TensorInfo] = {}
    if ADAPTER_WEIGHTS not in listing.files:
        pickled = [f for f in listing.skipped if f.endswith(PICKLED_WEIGHT_SUFFIXES) and f.startswith("adapter_model.")]
        if pickled:
            problems.append(f"pickled weights {', '.join(pickled)} are refused (unpickling runs code); convert to {ADAPTER_WEIGHTS}")
        else:
            problems.append(f"{ADAPTER_WEIGHTS} is missing")
    else:
        try:
            tensors = read_safetensors_header(path / ADAPTER_WEIGHTS)
        except ValueError as exc:
            problems.append(str(exc))
        else:
            if not tensors:
                problems.append(f"{ADAPTER_WEIGHTS} holds no tensors")
    try:
        kind: AdapterKind | None = kind_of(config.get("peft_type"), config)
    except UnknownKindError:
        kind = None  # `_config_problems` named it
    if kind is not None and kind.naming.per_module and not config.get("target_modules"):
        problems.append("'target_modules' is empty")
    if kind is not None and tensors and not problems:
        problems.extend(_structure_problems(kind, config, tensors))
    if problems:
        raise ValidationError(subject, problems)
    assert kind is not None
    alpha = config.get("lora_alpha")
    return AdapterManifest(
        path=path, peft_type=kind.peft_type, config=config, tensors=tensors, files=listing.files,
        rank=config.get("r"), alpha=float(alpha) if alpha is not None else None, target_modules=target_names(config),
        task_type=config.get("task_type"), skipped=listing.skipped,
    )


def _modules_to_save(config: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(config.get("modules_to_save") or ())


def _is_saved_module(key: str, modules_to_save: Iterable[str]) -> bool:
    stripped = key.removeprefix(PEFT_MODEL_PREFIX)
    return any(stripped.startswith(m + ".") or f".{m}." in stripped for m in modules_to_save)


def _structure_problems(kind: AdapterKind, config: Mapping[str, Any], tensors: Mapping[str, TensorInfo]) -> list[str]:
    """Tensor names against the kind's naming and the config's target modules, and rank consistency.

    Every module's rank and alpha are resolved here, so a pattern that backtracks
    catastrophically is found at import (one problem naming it), not in a merge or a hot load.
    """
    naming = kind.naming
    if not naming.per_module:
        return []
    try:
        return _module_problems(kind, config, tensors)
    except PatternError as exc:
        return [str(exc)]


def _module_problems(kind: AdapterKind, config: Mapping[str, Any], tensors: Mapping[str, TensorInfo]) -> list[str]:
    naming = kind.naming
    problems: list[str] = []
    saved = _modules_to_save(config)
    matches = target_matcher(config)
    parts_by_module: dict[str, dict[str, TensorPart]] = {}
    for key in tensors:
        parsed = naming.parse(key)
        if parsed is None:
            # PEFT also saves whole layers: embeddings it adapts (`save_embedding_layers`)
            # as `<module>.base_layer.weight`, and `modules_to_save` copies.
            saved_layer = key.removeprefix(PEFT_MODEL_PREFIX).removesuffix(".base_layer.weight")
            if saved_layer != key.removeprefix(PEFT_MODEL_PREFIX) and matches(saved_layer):
                continue
            if not _is_saved_module(key, saved):
                problems.append(f"tensor {key!r} is not a {kind.peft_type} weight of a target module")
            continue
        module, part = parsed
        if not matches(module):
            problems.append(f"tensor {key!r} belongs to module {module!r}, which target_modules {config.get('target_modules')!r} does not match")
        if len(tensors[key].shape) != part.ndim:
            problems.append(f"tensor {key!r} has shape {list(tensors[key].shape)}; a {part.suffix} is {part.ndim}-dimensional")
        parts_by_module.setdefault(module, {})[key] = part
    if not naming.factored:
        return problems
    for module, parts in sorted(parts_by_module.items()):
        factors = {part.factor: tensors[key].shape for key, part in parts.items() if part.factor}
        if len(factors) == 1:
            problems.append(f"module {module!r} has only one of {naming.part_names}")
        r = lora_rank(config, module) if config.get("r") is not None or config.get("rank_pattern") else None
        lora_alpha(config, module)  # resolved once here: a catastrophic alpha_pattern key is an import problem
        a_shape, b_shape = factors.get("A", ()), factors.get("B", ())
        if r and len(a_shape) == 2 and len(b_shape) == 2 and (a_shape[0] != r or b_shape[-1] != r):
            problems.append(f"module {module!r}: lora_A {list(a_shape)} and lora_B {list(b_shape)} do not have rank r={r}")
    return problems


def check_adapter_against_base(manifest: AdapterManifest, spec: BaseModelSpec) -> list[str]:
    """Every way the adapter does not fit the base model; empty when it fits (checks by the kind's layout)."""
    return _BASE_CHECKS[manifest.adapter_kind.naming.layout](manifest, spec)


def _module_parts_problems(manifest: AdapterManifest, spec: BaseModelSpec) -> list[str]:
    naming = manifest.adapter_kind.naming
    try:
        is_feedforward = feedforward_matcher(manifest.config)
        problems: list[str] = []
        missing: list[str] = []
        for key, info in manifest.tensors.items():
            parsed = naming.parse(key)
            if parsed is None:
                saved_layer = key.removeprefix(PEFT_MODEL_PREFIX).removesuffix(".base_layer.weight")
                base_shape = spec.module_shapes.get(saved_layer)
                if key.endswith(".base_layer.weight") and base_shape is not None and tuple(info.shape) != base_shape:
                    problems.append(f"{key}: shape {list(info.shape)} differs from the base model's {list(base_shape)}")
                continue
            module, part = parsed
            base_shape = spec.module_shapes.get(module)
            if base_shape is None:
                missing.append(module)
                continue
            out_f, in_f = (base_shape + (1,))[:2] if len(base_shape) == 1 else base_shape[:2]
            layout = part.feedforward_shape if part.feedforward_shape and is_feedforward(module) else part.shape
            expected = _expected_shape(layout, out_f, in_f, info.shape)
            if expected is not None and tuple(info.shape) != expected:
                problems.append(
                    f"{key}: shape {list(info.shape)} does not fit the base model's {module} {list(base_shape)} (expected {list(expected)})"
                )
    except PatternError as exc:
        return [str(exc)]
    if missing:
        unique = sorted(set(missing))
        shown = ", ".join(unique[:5]) + (f" and {len(unique) - 5} more" if len(unique) > 5 else "")
        problems.append(f"modules not in the base model ({spec.architecture}): {shown}")
    return problems


def _expected_shape(
    layout: tuple[str | int, ...] | None, out_f: int, in_f: int, actual: tuple[int, ...]
) -> tuple[int, ...] | None:
    """A part's `shape` filled in: `out`/`in` from the base weight, `r` from the tensor itself."""
    if layout is None:
        return None
    sizes = {"out": out_f, "in": in_f}
    return tuple(
        (actual[i] if i < len(actual) else 0) if dim == "r" else sizes.get(dim, dim)  # type: ignore[misc]
        for i, dim in enumerate(layout)
    )


def _virtual_token_problems(manifest: AdapterManifest, spec: BaseModelSpec) -> list[str]:
    """A prompt table's width against the base: the hidden size, or 2·layers·(hidden or kv) for a KV prefix."""
    config = manifest.config
    naming = manifest.adapter_kind.naming
    problems: list[str] = []
    (table_name,) = naming.names
    embeddings = manifest.tensors.get(table_name)
    if embeddings is None:
        return [f"{manifest.peft_type} adapter has no {table_name!r} tensor"]
    if len(embeddings.shape) != 2:
        return [f"{table_name!r} has shape {list(embeddings.shape)}; it is a 2-dimensional table"]
    token_dim = config.get("token_dim") or spec.hidden_size
    if naming.width == "hidden" and token_dim != spec.hidden_size:
        problems.append(f"token_dim {token_dim} differs from the base model's hidden size {spec.hidden_size}")
    if naming.width == "kv_prefix":
        layers = config.get("num_layers") or spec.num_layers
        if layers != spec.num_layers:
            problems.append(f"num_layers {layers} differs from the base model's {spec.num_layers}")
        width = embeddings.shape[-1]
        kv_width = spec.num_key_value_heads * spec.head_dim
        if config.get("prefix_projection"):
            pass  # the stored embedding is the pre-projection table; its width is token_dim
        elif width not in (2 * spec.num_layers * spec.hidden_size, 2 * spec.num_layers * kv_width):
            problems.append(
                f"prompt_embeddings width {width} fits neither 2·layers·hidden ({2 * spec.num_layers * spec.hidden_size}) "
                f"nor 2·layers·kv ({2 * spec.num_layers * kv_width}) of the base model"
            )
    elif embeddings.shape[-1] != spec.hidden_size:
        problems.append(f"prompt_embeddings width {embeddings.shape[-1]} differs from the base model's hidden size {spec.hidden_size}")
    return problems


def classification_head_of(architecture: str | None, base_architecture: str) -> bool:
    """Whether `architecture` is the sequence-classification variant of the base's causal LM.

    A full or layer-wise fine-tune for classification is saved by transformers as
    `XForSequenceClassification` (the base's body plus a `score` head, no `lm_head`); it is
    still a model of that base, so the registry keeps it on the base like any other full model.
    """
    if not architecture or not architecture.endswith("ForSequenceClassification"):
        return False
    stem = architecture.removesuffix("ForSequenceClassification")
    return base_architecture.removesuffix("ForCausalLM") == stem


# The classification heads transformers puts on decoder-only bodies (`score`) and encoders (`classifier`).
_CLASSIFICATION_HEAD_PREFIXES = ("score.", "classifier.")


def _full_model_problems(manifest: AdapterManifest, spec: BaseModelSpec) -> list[str]:
    problems: list[str] = []
    base_shapes = {f"{k}.weight": v for k, v in spec.module_shapes.items()} | dict(spec.param_shapes)
    arch = (manifest.config.get("architectures") or [None])[0]
    classifier = classification_head_of(arch, spec.architecture)
    for name, info in manifest.tensors.items():
        expected = base_shapes.get(name)
        if expected is None and classifier and name.startswith(_CLASSIFICATION_HEAD_PREFIXES):
            if info.shape and info.shape[-1] != spec.hidden_size:
                problems.append(f"classification head {name!r} has width {info.shape[-1]}, the base model's hidden size is {spec.hidden_size}")
        elif expected is None:
            problems.append(f"tensor {name!r} is not in the base model ({spec.architecture})")
        elif tuple(info.shape) != tuple(expected):
            problems.append(f"tensor {name!r} has shape {list(info.shape)}, the base model's is {list(expected)}")
    if arch and arch != spec.architecture and not classifier and not problems:
        problems.append(f"architecture {arch} differs from the base model's {spec.architecture}")
    return problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])


# What `check_adapter_against_base` checks, by the kind's tensor layout (`kinds.TensorNaming.layout`).
_BASE_CHECKS: dict[str, Callable[[AdapterManifest, BaseModelSpec], list[str]]] = {
    "module_parts": _module_parts_problems,
    "virtual_tokens": _virtual_token_problems,
    "base_model": _full_model_problems,
}
