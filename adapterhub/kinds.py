"""The table of adapter kinds, and PEFT's rules for which modules a config adapts.

Design decisions:
- One table says, for every kind of adapter adapterhub handles, what every part of it needs to
  know: its PEFT type and the config flags that pick the variant (DoRA and rsLoRA are LoRA
  configs with `use_dora`/`use_rslora`; PEFT has no type of their own), how its tensors are named
  and shaped (what validation checks), whether and how it merges (or why not), and which serving
  backends serve it (or why not, in words a user can act on). Validation (`formats`), the merge
  engine, the CLI and both serving backends look kinds up here instead of testing `peft_type`
  each in their own way (`why_not_served`, `describe_kind`, `served_kinds`, `TensorNaming.parse`). Kinds are registered like PEFT's `register_peft_method`: a duplicate
  name or variant is refused, a failed lookup lists the valid names, and every kind states its
  answer for every backend, so adding a backend means deciding what it serves, not inheriting
  a default.
- A kind's base name is its PEFT type in lower case (`lora`, `ia3`, `prompt_tuning`, `full`);
  variants have their own (`dora`, `rslora`, `dora+rslora`). `AdapterRecord.kind` holds it.
- What blocks a use whatever the kind (a task head other than a language model's,
  `modules_to_save`, LoRA biases, a PiSSA-style initialisation, `fan_in_fan_out` on the torch
  backend, a sequence-classifier full model in a merge) is a *trait*: a small registered
  predicate over the config and tensor names with the uses it rules out and why.
- PEFT's module matching lives here once (`TargetMatcher`, `feedforward_matcher`,
  `pattern_value`, `lora_scaling`), written to give what `peft.tuners.tuners_utils.
  check_target_module_exists`, `IA3Model._check_target_module_feedforward` and
  `peft.utils.other.get_pattern_key` give (tests compare them on a grid of names and patterns).
- Regular expressions from a config are the user's: they are matched with the `regex` package
  and a timeout (`REGEX_TIMEOUT_S` per match), because a catastrophic pattern (`(.|.)*_[kv]`)
  would otherwise hang an import or a hot load for hours with `re`. A timeout raises
  `PatternTimeoutError` naming the pattern and the module name it was matching, and the caller
  stops there, so a bad pattern costs one timeout, not one per module. They are also compiled
  by `re` when checked (`regex_problem`): PEFT compiles them with `re`, so one `re` refuses is
  refused here too. `regex`'s default (version 0) syntax is `re`'s.
- No torch, and nothing here reads a file: the registry imports this through `formats`.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import regex

from adapterhub.errors import AdapterhubError

FULL_MODEL_PEFT_TYPE = "FULL"
# PEFT's state dict keys start with this; module names in the base model do not.
PEFT_MODEL_PREFIX = "base_model.model."

#: Serving backends, by the name a `Backend` reports. Every kind says for each whether it serves it.
BACKENDS = ("torch", "vllm")
#: The uses a trait can rule out: merging, and serving on each backend.
USES = ("merge", *BACKENDS)

#: Seconds one match of a user's regex may take (a real one takes microseconds).
REGEX_TIMEOUT_S = 0.25


class UnknownKindError(AdapterhubError, KeyError):
    """A kind, PEFT type or backend name that is not in the table; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class PatternError(AdapterhubError, ValueError):
    """A regex from a config that cannot be used: it does not compile (`user_regex`), or it timed out."""


class PatternTimeoutError(PatternError):
    """A regex from a config took longer than `REGEX_TIMEOUT_S` on one name: it backtracks catastrophically."""

    def __init__(self, where: str, pattern: str, text: str) -> None:
        self.where, self.pattern, self.text = where, pattern, text
        super().__init__(
            f"{where} {pattern!r:.120} did not finish matching {text!r:.120} within {REGEX_TIMEOUT_S:g} s "
            "(the regex backtracks catastrophically); simplify it"
        )


# ---------------------------------------------------------------------------------------------
# User regexes


def regex_problem(pattern: str) -> str | None:
    """Why `pattern` is not a regular expression PEFT (`re`) and adapterhub (`regex`) both compile; None when fine."""
    for engine in (re, regex):
        try:
            engine.compile(pattern)
        except (re.error, regex.error, RecursionError, OverflowError, ValueError) as exc:
            return str(exc)
    return None


@dataclass(frozen=True)
class UserRegex:
    """A regular expression from a config, compiled once and matched with a timeout.

    `where` and `source` name it in errors as the user wrote it ("rank_pattern key", "q.*");
    `compiled` is the pattern PEFT actually matches, which may wrap the source.
    """

    where: str
    source: str
    compiled: regex.Pattern[str] = field(repr=False, compare=False)

    def fullmatch(self, text: str) -> bool:
        try:
            return self.compiled.fullmatch(text, timeout=REGEX_TIMEOUT_S) is not None
        except TimeoutError:
            raise PatternTimeoutError(self.where, self.source, text) from None

    def match(self, text: str) -> bool:
        try:
            return self.compiled.match(text, timeout=REGEX_TIMEOUT_S) is not None
        except TimeoutError:
            raise PatternTimeoutError(self.where, self.source, text) from None

    def match_group(self, text: str, group: str) -> str | None:
        try:
            found = self.compiled.match(text, timeout=REGEX_TIMEOUT_S)
        except TimeoutError:
            raise PatternTimeoutError(self.where, self.source, text) from None
        return found.group(group) if found is not None else None


@functools.lru_cache(maxsize=1024)
def user_regex(where: str, source: str, effective: str | None = None) -> UserRegex:
    """`source` (or the pattern PEFT builds from it, `effective`) compiled.

    A config the registry validated never fails here; one read straight from a directory (the
    server's load by path) may, and gets a `PatternError` naming the pattern.
    """
    pattern = source if effective is None else effective
    problem = regex_problem(pattern)
    if problem is not None:
        raise PatternError(f"{where} {source!r:.120} is not a regular expression ({problem})")
    return UserRegex(where=where, source=source, compiled=regex.compile(pattern))


# ---------------------------------------------------------------------------------------------
# PEFT's module matching


def pattern_key_regex(key: str) -> str:
    """The regex PEFT's `get_pattern_key` builds from a `rank_pattern`/`alpha_pattern` key."""
    return rf"(.*\.)?({key})$"


def modules_to_save_regex(name: str) -> str:
    """The regex `check_target_module_exists` builds from a `modules_to_save` entry (never adapted)."""
    return rf"(^|.*\.){name}($|\..*)"


def layers_pattern_regex(name: str) -> str:
    """The regex `check_target_module_exists` builds from a `layers_pattern` entry (the layer index follows it)."""
    return rf"(?:^|.*?\.){name}\.(?P<idx>\d+)\."


_ANY_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")  # PEFT's default: the first numbered segment
_ALL_LINEAR = "all-linear"


def _names(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@dataclass(frozen=True)
class TargetMatcher:
    """PEFT's `check_target_module_exists` for one config: does the adapter adapt this module?

    Built by `target_matcher` from a validated config. In order, as PEFT decides: an
    `exclude_modules` match, or a `modules_to_save` module, is never adapted; a string
    `target_modules` is a regex on the whole name (`all-linear` stands for every linear layer,
    which names alone cannot tell, so it matches any); a list matches a name or a `.`-suffix,
    then `layers_to_transform` keeps the listed layer indexes (found after `layers_pattern`,
    or at the first numbered segment).
    """

    target_regex: UserRegex | None = None
    target_names: tuple[str, ...] = ()
    all_linear: bool = False
    exclude_regex: UserRegex | None = None
    exclude_names: tuple[str, ...] = ()
    saved: tuple[UserRegex, ...] = ()
    layer_indexes: frozenset[int] | None = None
    layer_patterns: tuple[UserRegex, ...] = ()

    def __call__(self, module: str) -> bool:
        if self.exclude_regex is not None:
            if self.exclude_regex.fullmatch(module):
                return False
        elif module in self.exclude_names or any(module.endswith("." + name) for name in self.exclude_names):
            return False
        if any(pattern.match(module) for pattern in self.saved):
            return False
        if self.all_linear:
            return True
        if self.target_regex is not None:
            return self.target_regex.fullmatch(module)
        if module in self.target_names:
            found = True
        else:
            found = any(module.endswith("." + name) for name in self.target_names)
            if found and self.layer_indexes is not None:
                return self._layer_index(module) in self.layer_indexes
        return found

    def _layer_index(self, module: str) -> int | None:
        if not self.layer_patterns:
            found = _ANY_LAYER_INDEX.match(module)
            return int(found["idx"]) if found else None
        for pattern in self.layer_patterns:
            index = pattern.match_group(module, "idx")
            if index is not None:
                return int(index)
        return None


def target_matcher(config: Mapping[str, Any]) -> TargetMatcher:
    """The `TargetMatcher` of an adapter config whose fields have been validated (`formats`)."""
    targets = config.get("target_modules")
    excluded = config.get("exclude_modules")
    saved = tuple(user_regex("modules_to_save entry", name, modules_to_save_regex(name)) for name in config.get("modules_to_save") or ())
    common: dict[str, Any] = {"saved": saved}
    if isinstance(excluded, str):
        common["exclude_regex"] = user_regex("exclude_modules", excluded)
    elif excluded:
        common["exclude_names"] = tuple(excluded)
    if isinstance(targets, str):
        if targets.lower() == _ALL_LINEAR:
            return TargetMatcher(all_linear=True, **common)
        return TargetMatcher(target_regex=user_regex("target_modules", targets), **common)
    layers = config.get("layers_to_transform")
    indexes: frozenset[int] | None = None
    if isinstance(layers, int) and not isinstance(layers, bool):
        indexes = frozenset({layers})
    elif layers:
        indexes = frozenset(layers)
    # PEFT treats a missing or empty layers_pattern as "any layer pattern"; the entries of a list all count.
    names = _names(config.get("layers_pattern")) if config.get("layers_pattern") else ()
    patterns = tuple(user_regex("layers_pattern", name, layers_pattern_regex(name)) for name in names)
    return TargetMatcher(target_names=tuple(targets or ()), layer_indexes=indexes, layer_patterns=patterns, **common)


def feedforward_matcher(config: Mapping[str, Any]) -> Callable[[str], bool]:
    """PEFT's (IA)³ rule for `feedforward_modules`: a regex on the whole name, or a plain suffix (no `.` needed)."""
    modules = config.get("feedforward_modules")
    if isinstance(modules, str):
        return user_regex("feedforward_modules", modules).fullmatch
    names = tuple(modules or ())
    return lambda module: any(module.endswith(name) for name in names)


def pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any, *, where: str = "rank_pattern key") -> Any:
    """PEFT's `rank_pattern`/`alpha_pattern` lookup: the first key matching a `.`-suffix of the module.

    As `get_pattern_key` does, a module no key matches is looked up by its own name before the
    default applies (it matters only for keys that are not valid as the regex they spell).
    """
    if not patterns:
        return default
    for key, value in patterns.items():
        if user_regex(where, key, pattern_key_regex(key)).match(module):
            return value
    return patterns.get(module, default)


def lora_rank(config: Mapping[str, Any], module: str) -> Any:
    """The rank PEFT gives one module: `rank_pattern`, else `r` (PEFT's default 8)."""
    return pattern_value(config.get("rank_pattern"), module, config.get("r", 8))


def lora_alpha(config: Mapping[str, Any], module: str) -> Any:
    """The alpha PEFT gives one module: `alpha_pattern`, else `lora_alpha` (PEFT's default 8)."""
    return pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8), where="alpha_pattern key")


def lora_scaling(config: Mapping[str, Any], module: str, rank: int) -> float:
    """PEFT's scale of one LoRA module: α/r, or α/√r with rsLoRA (α through `alpha_pattern`).

    `rank` is the stored one (lora_A's rows), so a pattern and the tensors cannot disagree.
    """
    alpha = float(lora_alpha(config, module))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


# ---------------------------------------------------------------------------------------------
# The table

Layout = Literal["module_parts", "virtual_tokens", "base_model"]


@dataclass(frozen=True)
class TensorPart:
    """One tensor an adapter stores per adapted module, named `<module>.<suffix>`.

    `role` is the name merge and serving use (`lora_A` for `lora_A.weight`). `shape` is in terms
    of the base weight (`out`, `in` = its first two dimensions) and `r`, read from the tensor
    itself at that position; None where nothing is checked. `feedforward_shape` replaces it for
    (IA)³ feed-forward modules, which scale the input. `factor` marks the A and B of a low-rank pair.
    """

    suffix: str
    role: str
    ndim: int
    shape: tuple[str | int, ...] | None = None
    feedforward_shape: tuple[str | int, ...] | None = None
    factor: Literal["A", "B"] | None = None


@dataclass(frozen=True)
class TensorNaming:
    """How a kind's tensors are named in `adapter_model.safetensors` (or a full model's shards).

    `module_parts`: `base_model.model.<module>.<part suffix>` for each adapted module;
    `virtual_tokens`: the fixed `names` (a learned table of `width` "hidden" or "kv_prefix",
    2·layers·hidden or 2·layers·kv wide); `base_model`: the base model's own parameter names.
    """

    layout: Layout
    parts: tuple[TensorPart, ...] = ()
    names: tuple[str, ...] = ()
    width: Literal["hidden", "kv_prefix"] | None = None

    @property
    def per_module(self) -> bool:
        """Whether `target_modules` selects what it adapts (and tensors are parsed into modules)."""
        return self.layout == "module_parts"

    @property
    def factored(self) -> bool:
        """Whether it stores low-rank A/B factors (the LoRA family)."""
        return any(part.factor for part in self.parts)

    @property
    def part_names(self) -> str:
        """The roles it needs at least one of, for messages: `lora_A/lora_B`, `ia3_l`."""
        factors = [part.role for part in self.parts if part.factor and "embedding" not in part.role]
        return "/".join(factors or dict.fromkeys(part.role for part in self.parts))

    def parse(self, key: str) -> tuple[str, TensorPart] | None:
        """(module, part) of a stored tensor name, without PEFT's prefix; None when it is no part of this naming."""
        stripped = key.removeprefix(PEFT_MODEL_PREFIX)
        for part in self.parts:
            if stripped.endswith("." + part.suffix) and len(stripped) > len(part.suffix) + 1:
                return stripped[: -len(part.suffix) - 1], part
        return None


@dataclass(frozen=True)
class MergeRule:
    """How a kind's task vector τ = ΔW of one base weight is computed (`merge.task_vectors`).

    `low_rank`: τ is exactly (scale·B)·A, so merges of such inputs can stay an exact LoRA by
    rank concatenation. `reads_base`: τ depends on the base weight, which is then read.
    """

    name: str
    formula: str
    low_rank: bool = False
    reads_base: bool = False


LORA_PRODUCT = MergeRule("lora_product", "ΔW = (α/r)·B·A (α/√r with rsLoRA)", low_rank=True)
DORA = MergeRule("dora", "ΔW = m/‖W + sBA‖·(W + sBA) − W", reads_base=True)
IA3_SCALE = MergeRule("ia3_scale", "ΔW = W·(l − 1)", reads_base=True)
FULL_DIFFERENCE = MergeRule("full_difference", "ΔW = W_ft − W_base", reads_base=True)


@dataclass(frozen=True)
class AdapterKind:
    """One kind of adapter, as every part of adapterhub treats it.

    `serving` maps every backend in `BACKENDS` to None (it serves the kind) or the reason it
    cannot. `merge` is how it merges, or None with `not_mergeable` completing "a <KIND> adapter …".
    `flags` are the config flags (true/false) that pick this variant of `peft_type`.
    """

    name: str
    label: str
    peft_type: str
    naming: TensorNaming
    serving: Mapping[str, str | None]
    merge: MergeRule | None = None
    not_mergeable: str | None = None
    flags: Mapping[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "serving", MappingProxyType(dict(self.serving)))
        object.__setattr__(self, "flags", MappingProxyType(dict(self.flags)))

    def __hash__(self) -> int:
        return hash(self.name)  # names are unique in the table

    @property
    def display_name(self) -> str:
        """How messages name it, as PEFT spells types: `PROMPT_TUNING`, `DORA`."""
        return self.name.upper()

    @property
    def is_full_model(self) -> bool:
        return self.naming.layout == "base_model"

    def serves(self, backend: str) -> bool:
        """Whether `backend` serves this kind (traits of one adapter may still rule it out)."""
        return _checked_backend(backend) and self.serving[backend] is None


_KINDS: dict[str, AdapterKind] = {}


def register_kind(kind: AdapterKind) -> AdapterKind:
    """Add a kind to the table; refuses duplicates and incomplete entries (a programming error)."""
    if kind.name in _KINDS:
        raise ValueError(f"adapter kind {kind.name!r} is already registered")
    missing = [b for b in BACKENDS if b not in kind.serving]
    unknown = [b for b in kind.serving if b not in BACKENDS]
    if missing or unknown:
        raise ValueError(f"adapter kind {kind.name!r} must say for each backend {BACKENDS} whether it serves it "
                         f"(missing {missing}, unknown {unknown})")
    if (kind.merge is None) == (kind.not_mergeable is None):
        raise ValueError(f"adapter kind {kind.name!r} needs exactly one of merge and not_mergeable")
    siblings = [k for k in _KINDS.values() if k.peft_type == kind.peft_type]
    for sibling in siblings:
        if set(sibling.flags) != set(kind.flags):
            raise ValueError(f"adapter kind {kind.name!r}: variants of {kind.peft_type} must all set the flags {sorted(sibling.flags)}")
        if dict(sibling.flags) == dict(kind.flags):
            raise ValueError(f"adapter kind {kind.name!r} has the flags of {sibling.name!r}")
    if not siblings and kind.name != kind.peft_type.lower() and not kind.flags:
        raise ValueError(f"adapter kind {kind.name!r}: the kind of a PEFT type is named after it ({kind.peft_type.lower()!r})")
    _KINDS[kind.name] = kind
    return kind


def kinds() -> tuple[AdapterKind, ...]:
    """Every kind, in the order registered."""
    return tuple(_KINDS.values())


def kind_names() -> tuple[str, ...]:
    return tuple(_KINDS)


def peft_types(*, adapters_only: bool = False) -> tuple[str, ...]:
    """The PEFT types in the table, in order (`adapters_only`: without `FULL`)."""
    types = dict.fromkeys(k.peft_type for k in _KINDS.values() if not (adapters_only and k.is_full_model))
    return tuple(types)


def variant_flags() -> tuple[str, ...]:
    """Config flags that pick a variant (`use_dora`, `use_rslora`): what a kind needs besides the PEFT type."""
    return tuple(sorted({flag for k in _KINDS.values() for flag in k.flags}))


def get_kind(name: str) -> AdapterKind:
    """The kind called `name` (`dora`, `PROMPT_TUNING`: case does not matter); the error lists the valid names."""
    kind = _KINDS.get(name.lower()) if isinstance(name, str) else None
    if kind is None:
        raise UnknownKindError(f"unknown adapter kind {name!r:.80}; known kinds: {', '.join(_KINDS)}")
    return kind


def kind_of(peft_type: str, config: Mapping[str, Any] | None = None) -> AdapterKind:
    """The kind of an adapter with this PEFT type and config (a full model's type is `FULL`).

    Only the variant flags of `config` are read, so a registry summary that holds just those
    resolves like the full config.
    """
    candidates = [k for k in _KINDS.values() if k.peft_type == peft_type]
    if not candidates:
        raise UnknownKindError(f"unknown PEFT type {peft_type!r:.80}; known: {', '.join(peft_types())}")
    config = config or {}
    for kind in candidates:
        if all(bool(config.get(flag)) == wanted for flag, wanted in kind.flags.items()):
            return kind
    raise AssertionError(f"the variants of {peft_type} cover every setting of their flags")  # register_kind ensures it


def _checked_backend(backend: str) -> bool:
    if backend not in BACKENDS:
        raise UnknownKindError(f"unknown serving backend {backend!r:.80}; known: {', '.join(BACKENDS)}")
    return True


def served_kinds(backend: str) -> tuple[AdapterKind, ...]:
    """The kinds `backend` serves, in table order."""
    return tuple(k for k in _KINDS.values() if k.serves(backend))


def mergeable_kinds() -> tuple[AdapterKind, ...]:
    return tuple(k for k in _KINDS.values() if k.merge is not None)


def _listing(labels: Iterable[str]) -> str:
    items = list(labels)
    return ", ".join(items[:-1]) + f" and {items[-1]}" if len(items) > 1 else "".join(items)


# ---------------------------------------------------------------------------------------------
# Traits


@dataclass(frozen=True)
class Trait:
    """Something an adapter of any kind may have that rules some uses out.

    `detail(config, tensor_names)` describes it when present (`modules_to_save: score`) and is
    None when absent. `refused_by` maps each use it rules out (`USES`) to the reason, a clause
    in which `{detail}` stands for that description.
    """

    name: str
    detail: Callable[[Mapping[str, Any], Collection[str]], str | None]
    refused_by: Mapping[str, str]

    def __post_init__(self) -> None:
        object.__setattr__(self, "refused_by", MappingProxyType(dict(self.refused_by)))

    def __hash__(self) -> int:
        return hash(self.name)


_TRAITS: dict[str, Trait] = {}


def register_trait(trait: Trait) -> Trait:
    """Add a trait; refuses duplicates and unknown uses. Traits are checked in the order registered."""
    if trait.name in _TRAITS:
        raise ValueError(f"trait {trait.name!r} is already registered")
    unknown = [use for use in trait.refused_by if use not in USES]
    if unknown:
        raise ValueError(f"trait {trait.name!r} refuses unknown uses {unknown}; known: {USES}")
    _TRAITS[trait.name] = trait
    return trait


def traits() -> tuple[Trait, ...]:
    return tuple(_TRAITS.values())


def _trait_reasons(use: str, config: Mapping[str, Any], tensor_names: Collection[str]) -> list[str]:
    reasons = []
    for trait in _TRAITS.values():
        template = trait.refused_by.get(use)
        if template is None:
            continue
        detail = trait.detail(config, tensor_names)
        if detail is not None:
            reasons.append(template.format(detail=detail))
    return reasons


def merge_problems(
    kind: AdapterKind, config: Mapping[str, Any] | None = None, tensor_names: Collection[str] = (), *, ref: str | None = None,
) -> list[str]:
    """Why this adapter cannot be merged as a change of the base weights (empty when it can).

    `ref` names it in the messages (`math:2 is a PROMPT_TUNING adapter, which …`).
    """
    if kind.merge is None:
        if ref is not None:
            return [f"{ref} is a {kind.display_name} adapter, which {kind.not_mergeable} and cannot be merged"]
        labels = _listing(k.label for k in mergeable_kinds())
        return [f"a {kind.display_name} adapter {kind.not_mergeable} and cannot be merged (mergeable kinds: {labels})"]
    problems = _trait_reasons("merge", config or {}, tensor_names)
    return [f"{ref}: {p}" for p in problems] if ref is not None else problems


def why_not_served(
    kind: AdapterKind, backend: str, config: Mapping[str, Any] | None = None, tensor_names: Collection[str] = (),
) -> str | None:
    """Why `backend` cannot serve this adapter, or None when it can: the kind's reason (and what the
    backend serves instead), else every trait's, joined by "; ".

    `config` may be just what a registry summary has (`{"task_type": ...}`): a trait absent from
    it is taken as absent. Messages read "<describe_kind> adapters cannot be served by the
    <backend> backend: <this>".
    """
    _checked_backend(backend)
    reason = kind.serving[backend]
    if reason is not None:
        return f"{reason}; the {backend} backend serves {_listing(k.label for k in served_kinds(backend))} adapters"
    return "; ".join(_trait_reasons(backend, config or {}, tensor_names)) or None


def describe_kind(kind: AdapterKind, config: Mapping[str, Any] | None = None) -> str:
    """How messages name an adapter: its kind's label, and a head other than a language model's
    (`lora, sequence classification head`)."""
    head = _task_head(config or {}, ())
    return f"{kind.label}, {head}" if head else kind.label


# ---------------------------------------------------------------------------------------------
# The kinds adapterhub reads

_LORA_NAMING = TensorNaming(
    layout="module_parts",
    parts=(
        TensorPart("lora_A.weight", "lora_A", 2, ("r", "in"), factor="A"),
        TensorPart("lora_B.weight", "lora_B", 2, ("out", "r"), factor="B"),
        TensorPart("lora_A.bias", "lora_A.bias", 1),
        TensorPart("lora_B.bias", "lora_B.bias", 1),
        # nn.Embedding's weight is [num_embeddings, dim]; PEFT stores A as [r, num_embeddings], B as [dim, r].
        TensorPart("lora_embedding_A", "lora_embedding_A", 2, ("r", "out"), factor="A"),
        TensorPart("lora_embedding_B", "lora_embedding_B", 2, ("in", "r"), factor="B"),
        TensorPart("lora_magnitude_vector.weight", "lora_magnitude_vector", 1, ("out",)),
        TensorPart("lora_magnitude_vector", "lora_magnitude_vector", 1, ("out",)),
    ),
)
_IA3_NAMING = TensorNaming(
    layout="module_parts",
    parts=(
        TensorPart("ia3_l.weight", "ia3_l", 2, ("out", 1), feedforward_shape=(1, "in")),
        TensorPart("ia3_l", "ia3_l", 2, ("out", 1), feedforward_shape=(1, "in")),
    ),
)
_PROMPT_NAMING = TensorNaming(layout="virtual_tokens", names=("prompt_embeddings",), width="hidden")
_PREFIX_NAMING = TensorNaming(layout="virtual_tokens", names=("prompt_embeddings",), width="kv_prefix")
_FULL_NAMING = TensorNaming(layout="base_model")

_SERVED = None
_VLLM_LORA_ONLY = "vLLM serves LoRA adapters only"
_NOT_AN_ADAPTER = "it is a full model, not an adapter of the served base (serve it as its own base model)"
_PROMPT_WHY = "prompt tuning prepends learned virtual tokens to every request"
_P_TUNING_WHY = "p-tuning prepends virtual tokens produced by a prompt encoder"
_PREFIX_WHY = "prefix tuning injects a learned key/value prefix into every attention layer"
_NOT_A_DELTA = "is not a change of the base weights"

for _name, _label, _dora, _rslora in (
    ("lora", "lora", False, False),
    ("rslora", "lora with rsLoRA", False, True),
    ("dora", "lora with DoRA", True, False),
    ("dora+rslora", "lora with DoRA+rsLoRA", True, True),
):
    register_kind(AdapterKind(
        name=_name, label=_label, peft_type="LORA", naming=_LORA_NAMING,
        flags={"use_dora": _dora, "use_rslora": _rslora},
        merge=DORA if _dora else LORA_PRODUCT,
        # vLLM's PEFT loader: "vLLM does not yet support DoRA."
        serving={"torch": _SERVED, "vllm": "vLLM does not yet support DoRA" if _dora else _SERVED},
    ))
register_kind(AdapterKind(
    name="ia3", label="(IA)³", peft_type="IA3", naming=_IA3_NAMING, merge=IA3_SCALE,
    serving={"torch": _SERVED, "vllm": f"{_VLLM_LORA_ONLY}: its PEFT loader needs 'r' and 'lora_alpha', which (IA)³ scaling vectors do not have"},
))
register_kind(AdapterKind(
    name="prompt_tuning", label="prompt tuning", peft_type="PROMPT_TUNING", naming=_PROMPT_NAMING,
    not_mergeable=f"{_NOT_A_DELTA} ({_PROMPT_WHY})",
    serving={"torch": _PROMPT_WHY, "vllm": f"{_VLLM_LORA_ONLY}; {_PROMPT_WHY}"},
))
register_kind(AdapterKind(
    name="p_tuning", label="p-tuning", peft_type="P_TUNING", naming=_PROMPT_NAMING,
    not_mergeable=f"{_NOT_A_DELTA} ({_P_TUNING_WHY})",
    serving={"torch": _P_TUNING_WHY, "vllm": f"{_VLLM_LORA_ONLY}; {_P_TUNING_WHY}"},
))
register_kind(AdapterKind(
    name="prefix_tuning", label="prefix tuning", peft_type="PREFIX_TUNING", naming=_PREFIX_NAMING,
    not_mergeable=f"{_NOT_A_DELTA} ({_PREFIX_WHY})",
    serving={"torch": _PREFIX_WHY, "vllm": f"{_VLLM_LORA_ONLY}; {_PREFIX_WHY}"},
))
register_kind(AdapterKind(
    name="full", label="full model", peft_type=FULL_MODEL_PEFT_TYPE, naming=_FULL_NAMING, merge=FULL_DIFFERENCE,
    serving={"torch": _NOT_AN_ADAPTER, "vllm": _NOT_AN_ADAPTER},
))


# PEFT task types whose adapters end in another head than the base's language-model head.
_TASK_HEADS = {
    "SEQ_CLS": "sequence classification head",
    "TOKEN_CLS": "token classification head",
    "QUESTION_ANS": "question answering head",
    "FEATURE_EXTRACTION": "feature extraction (no language-model head)",
    "SEQ_2_SEQ_LM": "sequence-to-sequence model",
}
_GENERATIVE_TASKS = ("CAUSAL_LM",)


def _task_head(config: Mapping[str, Any], _tensor_names: Collection[str]) -> str | None:
    task = config.get("task_type")
    if not isinstance(task, str) or not task or task.upper() in _GENERATIVE_TASKS:
        return None
    return _TASK_HEADS.get(task.upper(), f"{task.lower()[:40]} task")


def _modules_to_save(config: Mapping[str, Any], _tensor_names: Collection[str]) -> str | None:
    saved = config.get("modules_to_save")
    if not saved:
        return None
    return "modules_to_save: " + (", ".join(map(str, saved)) if isinstance(saved, (list, tuple)) else str(saved))[:200]


def _lora_bias(config: Mapping[str, Any], names: Collection[str]) -> str | None:
    stored = any(n.endswith((".lora_A.bias", ".lora_B.bias")) for n in names)
    return "lora_bias" if config.get("lora_bias") or stored else None


def _fan_in_fan_out(config: Mapping[str, Any], _tensor_names: Collection[str]) -> str | None:
    return "fan_in_fan_out" if config.get("fan_in_fan_out") else None


# PiSSA, OLoRA, CorDA and LoftQ rewrite the base weights when they initialise the adapter; saved
# unconverted (without `path_initial_model_for_weight_conversion`) it is a change of that rewritten base.
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq")


def _residual_init(config: Mapping[str, Any], _tensor_names: Collection[str]) -> str | None:
    init = config.get("init_lora_weights")
    return f"init_lora_weights={init[:40]!r}" if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS) else None


def _classifier_model(config: Mapping[str, Any], _tensor_names: Collection[str]) -> str | None:
    architectures = config.get("architectures")
    architecture = architectures[0] if isinstance(architectures, list) and architectures else ""
    return architecture if isinstance(architecture, str) and architecture.endswith("ForSequenceClassification") else None


_NOT_GENERATIVE = "it was trained for a {detail}, and this server generates text with the base model's language-model head"
_RESIDUAL = ("it was initialised with {detail}, which rewrites the base weights, so it is a change of that rewritten base, "
             "not of this one (save it with path_initial_model_for_weight_conversion to make it a plain LoRA)")
register_trait(Trait("task_head", _task_head, {"torch": _NOT_GENERATIVE, "vllm": _NOT_GENERATIVE}))
register_trait(Trait("modules_to_save", _modules_to_save, {
    "merge": "it replaces whole modules of the base ({detail}): fully trained copies of layers are new weights, "
             "not a change of the base's, and cannot be merged",
    "torch": "it replaces whole modules of the base ({detail})",
    "vllm": "vLLM only supports modules_to_save being None ({detail})",
}))
register_trait(Trait("lora_bias", _lora_bias, {
    "merge": "LoRA bias terms (lora_bias) cannot be merged: a bias is not part of the low-rank change",
    "torch": "LoRA bias terms are not supported",
    "vllm": "vLLM does not serve LoRA bias terms (lora_bias)",
}))
register_trait(Trait("fan_in_fan_out", _fan_in_fan_out, {"torch": "fan_in_fan_out (Conv1D layers) is not supported"}))
register_trait(Trait("residual_init", _residual_init, {use: _RESIDUAL for use in USES}))
register_trait(Trait("classifier_model", _classifier_model, {
    # Its head is new weights, not a change of the base's: there is no task vector to take.
    "merge": "a sequence classifier ({detail}) has a classification head the base lacks and cannot be merged",
}))
