"""On-disk formats, read without torch: safetensors headers, base-model shapes, PEFT adapters.

The registry validates every import against the registered base model, and importing the
registry must not import torch (DESIGN.md), so everything here parses headers and JSON only.
A safetensors header is 8 bytes of little-endian length followed by JSON; reading it costs
microseconds whatever the size of the file, and it is enough to check names, dtypes, shapes
and that the data section is complete (a truncated file is caught here, not at load time).

The PEFT on-disk format (`adapter_config.json` + `adapter_model.safetensors`) is the
interchange format. A directory with `config.json` and `*.safetensors` weights instead is a
*full model* (full or layer-wise fine-tuning, a merged model): it is stored the same way, with
`peft_type` "FULL", so lineage, evaluations and serving treat both alike.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub.errors import ValidationError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
FULL_MODEL_PEFT_TYPE = "FULL"
PEFT_MODEL_PREFIX = "base_model.model."

_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024

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


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor infos of one safetensors file; raises ValueError naming what is wrong with it."""
    size = path.stat().st_size
    if size < 8:
        raise ValueError(f"{path.name} is empty or truncated ({size} bytes)")
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise ValueError(f"{path.name} is truncated or not safetensors (header of {header_len} bytes in a {size}-byte file)")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path.name} has an unreadable safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} has a safetensors header that is not a JSON object")
    data_len = size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path.name}: tensor {name!r} has a malformed header entry") from None
        expected = _DTYPE_BYTES.get(dtype, 0) * math.prod(shape)
        if dtype not in _DTYPE_BYTES or end - begin != expected or begin < 0:
            raise ValueError(f"{path.name}: tensor {name!r} has inconsistent dtype/shape/offsets")
        data_end = max(data_end, end)
        tensors[name] = TensorInfo(dtype=dtype, shape=shape, byte_range=(8 + header_len + begin, 8 + header_len + end))
    if data_end > data_len:
        raise ValueError(f"{path.name} is truncated: tensors need {data_end} data bytes, the file has {data_len}")
    return tensors


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


def _load_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValidationError(what, [f"{path.name} is missing in {path.parent}"]) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValidationError(what, [f"{path.name} does not parse as JSON: {exc}"]) from None
    if not isinstance(data, dict):
        raise ValidationError(what, [f"{path.name} is not a JSON object"])
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


def base_model_spec(model_dir: Path) -> BaseModelSpec:
    """Read a transformers model directory's config and weight shapes (no torch)."""
    config = _load_json(model_dir / "config.json", f"model {model_dir}")
    tensors = model_tensor_infos(model_dir)
    text_config = config.get("text_config") or config
    module_shapes = {n.removesuffix(".weight"): t.shape for n, t in tensors.items() if n.endswith(".weight")}
    param_shapes = {n: t.shape for n, t in tensors.items() if not n.endswith(".weight")}
    heads = int(text_config.get("num_attention_heads", 1))
    return BaseModelSpec(
        architecture=(config.get("architectures") or ["unknown"])[0],
        model_type=str(config.get("model_type", "unknown")),
        hidden_size=int(text_config.get("hidden_size", 0)),
        num_layers=int(text_config.get("num_hidden_layers", 0)),
        vocab_size=int(text_config.get("vocab_size", 0)),
        num_attention_heads=heads,
        num_key_value_heads=int(text_config.get("num_key_value_heads") or heads),
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
    """What an adapter directory holds, parsed and structurally checked, not yet against a base."""

    path: Path
    peft_type: str
    config: Mapping[str, Any]
    tensors: Mapping[str, TensorInfo]
    files: tuple[str, ...]
    rank: int | None = None
    alpha: float | None = None
    target_modules: tuple[str, ...] = ()
    task_type: str | None = None

    @property
    def is_full_model(self) -> bool:
        return self.peft_type == FULL_MODEL_PEFT_TYPE


def _target_matcher(target_modules: Any) -> tuple[Any, tuple[str, ...]]:
    """PEFT's matching rule: a string is a regex on the full module name, a list matches suffixes."""
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return (lambda module: True), ("all-linear",)
        pattern = re.compile(target_modules)
        return (lambda module: pattern.fullmatch(module) is not None), (target_modules,)
    targets = tuple(sorted(target_modules or ()))
    target_set = set(targets)
    return (lambda module: module in target_set or any(module.endswith("." + t) for t in targets)), targets


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches when it is a suffix regex of the module."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


_LORA_SUFFIX = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_A\.bias|lora_B\.bias|lora_embedding_A|lora_embedding_B|"
    r"lora_magnitude_vector(?:\.weight)?)$"
)
_IA3_SUFFIX = re.compile(r"^(?P<module>.+)\.ia3_l(?:\.weight)?$")


def read_adapter_dir(path: Path) -> AdapterManifest:
    """Parse and structurally check a PEFT adapter or full-model directory.

    Raises one `ValidationError` listing every problem. Pickled weights are refused: loading
    them runs arbitrary code (the CLI offers a `weights_only` conversion before import).
    """
    subject = f"adapter {path}"
    if not path.exists():
        raise ValidationError(subject, ["the directory does not exist"])
    if not path.is_dir():
        raise ValidationError(subject, ["not a directory (give the folder that holds adapter_config.json)"])
    files = tuple(sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()))
    if (path / ADAPTER_CONFIG).exists():
        return _read_peft_dir(path, files)
    if (path / "config.json").exists() and weight_files(path):
        return _read_full_model_dir(path, files)
    pickled = [f for f in files if f.endswith(PICKLED_WEIGHT_SUFFIXES)]
    problems = [f"no {ADAPTER_CONFIG} (a PEFT adapter) and no config.json with *.safetensors (a full model)"]
    if pickled:
        problems.append(f"pickled weights {', '.join(pickled)} are refused; convert them to safetensors")
    raise ValidationError(subject, problems)


def _read_full_model_dir(path: Path, files: tuple[str, ...]) -> AdapterManifest:
    config = _load_json(path / "config.json", f"model {path}")
    tensors = model_tensor_infos(path)
    return AdapterManifest(
        path=path, peft_type=FULL_MODEL_PEFT_TYPE, config=config, tensors=tensors, files=files,
        task_type=None,
    )


def _read_peft_dir(path: Path, files: tuple[str, ...]) -> AdapterManifest:
    subject = f"adapter {path}"
    problems: list[str] = []
    config = _load_json(path / ADAPTER_CONFIG, subject)
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or not peft_type:
        problems.append(f"{ADAPTER_CONFIG} has no 'peft_type'")
    weights = path / ADAPTER_WEIGHTS
    tensors: dict[str, TensorInfo] = {}
    if not weights.exists():
        pickled = [f for f in files if f.endswith(PICKLED_WEIGHT_SUFFIXES)]
        if pickled:
            problems.append(f"pickled weights {', '.join(pickled)} are refused (unpickling runs code); convert to {ADAPTER_WEIGHTS}")
        else:
            problems.append(f"{ADAPTER_WEIGHTS} is missing")
    else:
        try:
            tensors = read_safetensors_header(weights)
        except ValueError as exc:
            problems.append(str(exc))
        else:
            if not tensors:
                problems.append(f"{ADAPTER_WEIGHTS} holds no tensors")
    rank = alpha = None
    targets: tuple[str, ...] = ()
    if isinstance(peft_type, str):
        peft_type = peft_type.upper()
        if "r" in config and config["r"] is not None:
            if not isinstance(config["r"], int) or config["r"] < 1:
                problems.append(f"'r' must be a positive integer, got {config['r']!r}")
            else:
                rank = config["r"]
        if config.get("lora_alpha") is not None:
            if not isinstance(config["lora_alpha"], (int, float)):
                problems.append(f"'lora_alpha' must be a number, got {config['lora_alpha']!r}")
            else:
                alpha = float(config["lora_alpha"])
        raw_targets = config.get("target_modules")
        if raw_targets is not None and not isinstance(raw_targets, (str, list)):
            problems.append(f"'target_modules' must be a list or a regex string, got {raw_targets!r}")
        else:
            _, targets = _target_matcher(raw_targets)
        if peft_type in ("LORA", "IA3") and not raw_targets:
            problems.append("'target_modules' is empty")
        if tensors and not problems:
            problems.extend(_structure_problems(peft_type, config, tensors))
    if problems:
        raise ValidationError(subject, problems)
    return AdapterManifest(
        path=path, peft_type=str(peft_type), config=config, tensors=tensors, files=files,
        rank=rank, alpha=alpha, target_modules=targets, task_type=config.get("task_type"),
    )


def _module_of(key: str, suffix_re: re.Pattern[str]) -> tuple[str, str] | None:
    match = suffix_re.match(key.removeprefix(PEFT_MODEL_PREFIX))
    return (match["module"], match.group(2) if suffix_re is _LORA_SUFFIX else "ia3_l") if match else None


def _modules_to_save(config: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(config.get("modules_to_save") or ())


def _is_saved_module(key: str, modules_to_save: Iterable[str]) -> bool:
    stripped = key.removeprefix(PEFT_MODEL_PREFIX)
    return any(stripped.startswith(m + ".") or f".{m}." in stripped for m in modules_to_save)


def _structure_problems(peft_type: str, config: Mapping[str, Any], tensors: Mapping[str, TensorInfo]) -> list[str]:
    """Tensor names against the config's target modules, and rank consistency."""
    problems: list[str] = []
    saved = _modules_to_save(config)
    if peft_type in ("LORA", "IA3"):
        matches, _ = _target_matcher(config.get("target_modules"))
        suffix_re = _LORA_SUFFIX if peft_type == "LORA" else _IA3_SUFFIX
        parts_by_module: dict[str, set[str]] = {}
        for key in tensors:
            parsed = _module_of(key, suffix_re)
            if parsed is None:
                # PEFT also saves whole layers: embeddings it adapts (`save_embedding_layers`)
                # as `<module>.base_layer.weight`, and `modules_to_save` copies.
                saved_layer = key.removeprefix(PEFT_MODEL_PREFIX).removesuffix(".base_layer.weight")
                if saved_layer != key.removeprefix(PEFT_MODEL_PREFIX) and matches(saved_layer):
                    continue
                if not _is_saved_module(key, saved):
                    problems.append(f"tensor {key!r} is not a {peft_type} weight of a target module")
                continue
            module, part = parsed
            if not matches(module):
                problems.append(f"tensor {key!r} belongs to module {module!r}, which target_modules {config.get('target_modules')!r} does not match")
            parts_by_module.setdefault(module, set()).add(part)
        if peft_type == "LORA":
            for module, parts in sorted(parts_by_module.items()):
                has_a = {"lora_A.weight", "lora_embedding_A"} & parts
                has_b = {"lora_B.weight", "lora_embedding_B"} & parts
                if bool(has_a) != bool(has_b):
                    problems.append(f"module {module!r} has only one of lora_A/lora_B")
                r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r"))
                a_key = next((k for k in tensors if k.removeprefix(PEFT_MODEL_PREFIX) in (f"{module}.lora_A.weight",)), None)
                b_key = next((k for k in tensors if k.removeprefix(PEFT_MODEL_PREFIX) in (f"{module}.lora_B.weight",)), None)
                if a_key and b_key and r:
                    a_shape, b_shape = tensors[a_key].shape, tensors[b_key].shape
                    if a_shape[0] != r or b_shape[-1] != r:
                        problems.append(
                            f"module {module!r}: lora_A {list(a_shape)} and lora_B {list(b_shape)} do not have rank r={r}"
                        )
    return problems


def check_adapter_against_base(manifest: AdapterManifest, spec: BaseModelSpec) -> list[str]:
    """Every way the adapter does not fit the base model; empty when it fits."""
    if manifest.is_full_model:
        return _full_model_problems(manifest, spec)
    config = manifest.config
    peft_type = manifest.peft_type
    problems: list[str] = []
    if peft_type in ("LORA", "IA3"):
        suffix_re = _LORA_SUFFIX if peft_type == "LORA" else _IA3_SUFFIX
        feedforward = set(config.get("feedforward_modules") or ())
        missing: list[str] = []
        for key, info in manifest.tensors.items():
            parsed = _module_of(key, suffix_re)
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
            expected = _expected_shape(peft_type, part, module, out_f, in_f, info.shape, config, feedforward)
            if expected is not None and tuple(info.shape) != expected:
                problems.append(
                    f"{key}: shape {list(info.shape)} does not fit the base model's {module} {list(base_shape)} (expected {list(expected)})"
                )
        if missing:
            unique = sorted(set(missing))
            shown = ", ".join(unique[:5]) + (f" and {len(unique) - 5} more" if len(unique) > 5 else "")
            problems.append(f"modules not in the base model ({spec.architecture}): {shown}")
    elif peft_type in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
        problems.extend(_prompt_learning_problems(manifest, spec))
    return problems


def _expected_shape(
    peft_type: str, part: str, module: str, out_f: int, in_f: int, actual: tuple[int, ...],
    config: Mapping[str, Any], feedforward: set[str],
) -> tuple[int, ...] | None:
    rank = actual[0] if part in ("lora_A.weight", "lora_embedding_A") else (actual[-1] if actual else 0)
    is_embedding = "embed" in module.split(".")[-1] or part.startswith("lora_embedding")
    if peft_type == "IA3":
        is_ff = any(module == f or module.endswith("." + f) for f in feedforward)
        return (1, in_f) if is_ff else (out_f, 1)
    if part == "lora_A.weight":
        return (rank, in_f)
    if part == "lora_B.weight":
        return (out_f, rank)
    if part == "lora_embedding_A":
        # nn.Embedding weight is [num_embeddings, embedding_dim]; PEFT stores A as [r, num_embeddings].
        return (rank, out_f) if is_embedding else None
    if part == "lora_embedding_B":
        return (in_f, rank)
    if part.startswith("lora_magnitude_vector"):
        return (out_f,)
    return None


def _prompt_learning_problems(manifest: AdapterManifest, spec: BaseModelSpec) -> list[str]:
    config = manifest.config
    problems: list[str] = []
    embeddings = manifest.tensors.get("prompt_embeddings")
    if embeddings is None:
        return [f"{manifest.peft_type} adapter has no 'prompt_embeddings' tensor"]
    token_dim = config.get("token_dim") or spec.hidden_size
    if manifest.peft_type != "PREFIX_TUNING" and token_dim != spec.hidden_size:
        problems.append(f"token_dim {token_dim} differs from the base model's hidden size {spec.hidden_size}")
    if manifest.peft_type == "PREFIX_TUNING":
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
