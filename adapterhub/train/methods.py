"""Turn a base model into a trainable model for each method, and check up front that it can run.

Design decisions:
- Every method is built from PEFT's own configs (`LoraConfig` with `use_dora`/`use_rslora`,
  `IA3Config`, `PromptTuningConfig`, `PrefixTuningConfig`) and bitsandbytes' quantization
  through transformers' `BitsAndBytesConfig`; nothing here re-implements an adapter.
- The model is wrapped here (not by passing `peft_config` to the trainer) so SFTTrainer and
  the plain `Trainer` used for classification see the same kind of model, and so the saved
  adapter is exactly PEFT's format.
- `full` trains every weight; `layerwise` freezes everything but the top-k transformer blocks
  (the blocks nearest the output adapt most to a new task and cost the least to train). Both
  save a whole model directory.
- `environment_problems` collects everything that would make a run fail after minutes of
  loading (base of the wrong kind for the task, bitsandbytes missing, fp16 asked on a CPU)
  and reports it before any weight is read.
- A QLoRA model's 4-bit layers are kept out of bitsandbytes' CPU inference repack
  (`keep_4bit_layers_trainable`). On CPUs with AVX-512 BF16 (Intel Xeon with AMX),
  bitsandbytes 0.50's `Linear4bit.forward` rewrites its weight, in place and for good, into a
  layout for a fast inference kernel the first time it runs in eval mode on an input that needs
  no gradient, which is what every evaluation (and `generate`) does. That kernel has no
  backward, so from then on no gradient reaches any LoRA weight below a 4-bit layer: the
  evaluation before the first step would silently freeze the whole run. The layer's own switch
  for the repack (`support_avx512bf16_for_cpu`, set at construction from the CPU's features) is
  turned off on the trainable model only; evaluation then takes the dequantizing path that
  training takes. Other machines (AMD CPUs, CUDA) never repack, so nothing changes there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapterhub.errors import AdapterhubError
from adapterhub.train.config import FULL_MODEL_METHODS, Method, Task, TrainConfig

# PEFT's default IA3 feed-forward module names, for user-given target lists.
_FEEDFORWARD_NAMES = ("down_proj", "fc2", "mlp.c_proj", "dense_4h_to_h", "w2")


def read_base_config(base_dir: Path) -> dict[str, Any]:
    path = base_dir / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}


def is_causal_lm(base_config: dict[str, Any]) -> bool:
    """Whether the base is a decoder-only language model transformers can load as causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = base_config.get("architectures") or []
    if any(arch.endswith("ForCausalLM") for arch in architectures):
        return True
    # Encoders (BERT, MiniLM) are in the causal-LM mapping too (as decoders), so only trust
    # the model type when no architecture says otherwise.
    return not architectures and base_config.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def bitsandbytes_problem() -> str | None:
    """Why bitsandbytes cannot quantize here, or None when it can (CUDA, or its CPU backend)."""
    from adapterhub.models import import_bitsandbytes

    try:
        import_bitsandbytes()
    except Exception as exc:  # import errors of compiled libraries come in several types
        return f"qlora needs bitsandbytes, which cannot be imported here ({type(exc).__name__}: {exc})"
    import torch

    if not torch.cuda.is_available() and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "qlora: bitsandbytes has no backend for Apple MPS; use lora"
    return None


def resolve_precision(requested: str) -> tuple[str, list[str]]:
    """The precision a run uses ('fp32', 'bf16', 'fp16') and any problem with the request."""
    import torch

    cuda = torch.cuda.is_available()
    if requested == "auto":
        if cuda:
            return ("bf16" if torch.cuda.is_bf16_supported() else "fp16"), []
        return "fp32", []
    if requested == "fp16" and not cuda:
        return requested, ["precision fp16 needs a CUDA GPU (use fp32 or bf16 on CPU)"]
    if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        return requested, ["precision bf16 is not supported by this GPU (use fp16)"]
    return requested, []


def environment_problems(config: TrainConfig, base_dir: Path) -> list[str]:
    """Problems that depend on the base model or the machine (not on the data)."""
    problems: list[str] = []
    if not (base_dir / "config.json").is_file():
        return [f"base model directory {base_dir} has no config.json"]
    base_config = read_base_config(base_dir)
    causal = is_causal_lm(base_config)
    architecture = (base_config.get("architectures") or [base_config.get("model_type", "unknown")])[0]
    if config.task == Task.SETFIT and causal:
        problems.append(
            f"task setfit needs a sentence encoder (e.g. the embedded all-MiniLM-L6-v2), "
            f"but the base is a causal LM ({architecture})"
        )
    if config.task != Task.SETFIT and not causal:
        problems.append(f"task {config.task.value} needs a causal language model base, but the base is {architecture}")
    if config.method == Method.QLORA:
        problem = bitsandbytes_problem()
        if problem:
            problems.append(problem)
    if config.method == Method.LAYERWISE and causal:
        layers = int((base_config.get("text_config") or base_config).get("num_hidden_layers", 0) or 0)
        if layers and config.layerwise_top_k > layers:
            problems.append(f"layerwise_top_k {config.layerwise_top_k} exceeds the base's {layers} blocks")
    _, precision_problems = resolve_precision(config.precision)
    problems.extend(precision_problems)
    return problems


def _torch_dtype(precision: str) -> Any:
    import torch

    # Full-precision master weights for fp16 runs (the AMP scaler refuses fp16 parameters); bf16
    # runs keep bf16 weights, which halves memory and is what bf16-capable GPUs are for.
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float32}[precision]


def _quantization_config(config: TrainConfig, precision: str) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    if config.quant_bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute_dtype = torch.bfloat16 if precision == "bf16" else (torch.float16 if precision == "fp16" else torch.float32)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _peft_config(config: TrainConfig, task_type: str, tokenizer: Any, base_dir: Path) -> Any:
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit

    method = config.method
    modules_to_save = ["score"] if task_type == "SEQ_CLS" else None
    if method in (Method.LORA, Method.QLORA, Method.DORA):
        return LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.target_modules,
            use_rslora=config.use_rslora,
            use_dora=method == Method.DORA,
            task_type=task_type,
            modules_to_save=modules_to_save,
        )
    if method == Method.IA3:
        targets = config.target_modules
        feedforward = None
        if isinstance(targets, list):
            feedforward = [t for t in targets if any(t.endswith(name) for name in _FEEDFORWARD_NAMES)]
        return IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type=task_type, modules_to_save=modules_to_save)
    if method == Method.PROMPT_TUNING:
        if config.prompt_init_text:
            return PromptTuningConfig(
                num_virtual_tokens=config.num_virtual_tokens,
                prompt_tuning_init=PromptTuningInit.TEXT,
                prompt_tuning_init_text=config.prompt_init_text,
                tokenizer_name_or_path=str(base_dir),
                task_type=task_type,
            )
        return PromptTuningConfig(num_virtual_tokens=config.num_virtual_tokens, task_type=task_type)
    if method == Method.PREFIX_TUNING:
        return PrefixTuningConfig(num_virtual_tokens=config.num_virtual_tokens, task_type=task_type)
    raise ValueError(f"no PEFT config for method {method.value}")


def keep_4bit_layers_trainable(model: Any) -> int:
    """Keep every 4-bit layer of `model` out of bitsandbytes' CPU inference repack; returns how many.

    See the module docstring: the repack happens on the first eval-mode forward without
    gradients and leaves a layout whose kernel has no backward, so LoRA weights of a model that
    is evaluated and then trained (before/after validation, resume, `generate`) would get zero
    gradients. Only a layer that has not been repacked yet can be kept out of it, so this runs
    right after loading, before any forward pass.
    """
    from adapterhub.models import import_bitsandbytes

    bnb = import_bitsandbytes()
    kept = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        if getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False):
            # Not reachable from a fresh `from_pretrained`; a model that ran inference first cannot be trained.
            raise AdapterhubError("qlora: a 4-bit layer was already repacked for CPU inference; load a fresh model to train")
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            kept += 1
    return kept


def transformer_blocks(model: Any) -> Any:
    """The ModuleList of a model's transformer blocks (the longest ModuleList of modules)."""
    import torch

    best = None
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and (best is None or len(module) > len(best)):
            best = module
    if best is None:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")
    return best


def build_model(
    config: TrainConfig,
    base_dir: Path,
    *,
    tokenizer: Any,
    precision: str,
    labels: list[str] | None = None,
) -> Any:
    """Load the base and make it trainable for `config.method` and `config.task`."""
    from peft import get_peft_model

    model, peft_config = build_base(config, base_dir, tokenizer=tokenizer, precision=precision, labels=labels)
    return model if peft_config is None else get_peft_model(model, peft_config)


def build_base(
    config: TrainConfig,
    base_dir: Path,
    *,
    tokenizer: Any,
    precision: str,
    labels: list[str] | None = None,
) -> tuple[Any, Any | None]:
    """The loaded base, ready for `config.method`, and the PEFT config to wrap it in (None for full/layerwise).

    Kept apart from the wrapping because TRL's preference trainers take the base and the PEFT
    config separately: DPOTrainer then uses the base with the adapter switched off as its
    reference (no second copy), where a model wrapped beforehand gets a copied "ref" adapter.
    A reward model is a sequence classifier with one output (the score).
    """
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = _torch_dtype(precision)
    load_kwargs: dict[str, Any] = {"dtype": dtype}
    if config.method == Method.QLORA:
        load_kwargs["quantization_config"] = _quantization_config(config, precision)
        if torch.cuda.is_available():
            # Quantized weights must sit on the GPU from the start; under accelerate, the local one.
            from adapterhub.train.distributed import process_state

            load_kwargs["device_map"] = {"": process_state().local_process_index}
    sequence_classifier = config.task in (Task.CLASSIFICATION, Task.REWARD)
    if config.task == Task.CLASSIFICATION:
        assert labels is not None
        model = AutoModelForSequenceClassification.from_pretrained(
            base_dir,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            **load_kwargs,
        )
    elif config.task == Task.REWARD:
        model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, **load_kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir, **load_kwargs)
    if sequence_classifier:
        model.config.pad_token_id = tokenizer.pad_token_id
    task_type = "SEQ_CLS" if sequence_classifier else "CAUSAL_LM"
    if config.method == Method.QLORA:
        keep_4bit_layers_trainable(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    if config.method in FULL_MODEL_METHODS:
        if config.method == Method.LAYERWISE:
            model.requires_grad_(False)
            blocks = transformer_blocks(model)
            for block in list(blocks)[-config.layerwise_top_k:]:
                block.requires_grad_(True)
            if sequence_classifier:
                # The head is new (randomly initialised): it must train with the top blocks.
                classification_head(model).requires_grad_(True)
        return model, None
    return model, _peft_config(config, task_type, tokenizer, base_dir)


def classification_head(model: Any) -> Any:
    """The sequence-classification head transformers put on the body (`score` or `classifier`)."""
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if head is not None:
            return head
    raise ValueError(f"cannot find the classification head of {type(model).__name__}")


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
