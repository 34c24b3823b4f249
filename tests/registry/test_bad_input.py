"""Every kind of bad input gets one error naming every problem and changes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy
import torch
from safetensors.numpy import load_file, save_file

from adapterhub.errors import AdapterhubError, AmbiguousRefError, NotFoundError, ValidationError
from adapterhub.registry import Registry
from tests.conftest import build_lora_adapter
from tests.registry.conftest import registry_state


def _copy(lora_dir: Path, tmp_path: Path, name: str = "bad") -> Path:
    return Path(shutil.copytree(lora_dir, tmp_path / name))


def _assert_rejected(registry: Registry, source: Path, match: str, *, name: str = "x") -> ValidationError | AdapterhubError:
    before = registry_state(registry)
    with pytest.raises(AdapterhubError, match=match) as info:
        registry.put_adapter(name=name, source_dir=source, base="tiny")
    assert registry_state(registry) == before
    return info.value


def test_missing_adapter_config(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    bad = _copy(lora_dir, tmp_path)
    (bad / "adapter_config.json").unlink()
    _assert_rejected(registry, bad, "no adapter_config.json")


def test_config_that_does_not_parse(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    bad = _copy(lora_dir, tmp_path)
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    _assert_rejected(registry, bad, "does not parse as JSON")


def test_tensor_names_not_matching_target_modules(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    bad = _copy(lora_dir, tmp_path)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["target_modules"] = ["k_proj"]
    (bad / "adapter_config.json").write_text(json.dumps(config))
    error = _assert_rejected(registry, bad, "target_modules")
    # Every mismatching tensor is listed in the one error (2 layers x q,v x A,B).
    assert isinstance(error, ValidationError) and len(error.problems) == 8


def test_rank_inconsistent_with_config(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    bad = _copy(lora_dir, tmp_path)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["r"] = 8
    (bad / "adapter_config.json").write_text(json.dumps(config))
    _assert_rejected(registry, bad, "do not have rank r=8")


def test_shapes_that_do_not_fit_the_base(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    bad = _copy(lora_dir, tmp_path)
    tensors = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = np.zeros((4, 80), dtype=np.float32)
    save_file(tensors, bad / "adapter_model.safetensors")
    _assert_rejected(registry, bad, r"shape \[4, 80\] does not fit")


def test_adapter_of_another_base(registry: Registry, tiny_base_other: Path, tmp_path: Path) -> None:
    foreign = build_lora_adapter(tiny_base_other, tmp_path / "foreign")
    error = _assert_rejected(registry, foreign, "does not fit base model 'tiny'")
    assert isinstance(error, ValidationError) and len(error.problems) == 8  # every tensor named


def test_modules_missing_from_the_base(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    bad = _copy(lora_dir, tmp_path)
    tensors = load_file(bad / "adapter_model.safetensors")
    renamed = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    save_file(renamed, bad / "adapter_model.safetensors")
    _assert_rejected(registry, bad, "modules not in the base model")


def test_pickled_bin_weights_are_refused(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    bad = _copy(lora_dir, tmp_path)
    state = {k: torch.from_numpy(v) for k, v in load_file(bad / "adapter_model.safetensors").items()}
    (bad / "adapter_model.safetensors").unlink()
    torch.save(state, bad / "adapter_model.bin")
    _assert_rejected(registry, bad, "pickled weights adapter_model.bin are refused")


def test_empty_and_truncated_safetensors(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    empty = _copy(lora_dir, tmp_path, "empty")
    (empty / "adapter_model.safetensors").write_bytes(b"")
    _assert_rejected(registry, empty, "empty or truncated")
    truncated = _copy(lora_dir, tmp_path, "truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) - 100])
    _assert_rejected(registry, truncated, "truncated")
    header_only = _copy(lora_dir, tmp_path, "header")
    (header_only / "adapter_model.safetensors").write_bytes(data[:20])
    _assert_rejected(registry, header_only, "truncated or not safetensors")


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", "bad\x07name", "", "..", "-leading"])
def test_bad_names_are_refused(registry: Registry, lora_dir: Path, name: str) -> None:
    _assert_rejected(registry, lora_dir, "name", name=name)


def test_bad_tag_is_refused(registry: Registry, lora_dir: Path) -> None:
    before = registry_state(registry)
    with pytest.raises(ValidationError, match="tag"):
        registry.put_adapter(name="ok", source_dir=lora_dir, base="tiny", tags=("../x",))
    assert registry_state(registry) == before


def test_unknown_base(registry: Registry, lora_dir: Path) -> None:
    with pytest.raises(AdapterhubError, match="no base model named 'tinyy'; did you mean: tiny"):
        registry.put_adapter(name="x", source_dir=lora_dir, base="tinyy")


def test_all_problems_reported_at_once(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    bad = _copy(lora_dir, tmp_path)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["r"] = "four"
    config["lora_alpha"] = "big"
    (bad / "adapter_config.json").write_text(json.dumps(config))
    error = _assert_rejected(registry, bad, "2 problems")
    assert isinstance(error, ValidationError)
    assert any("'r' must be a positive integer" in p for p in error.problems)
    assert any("'lora_alpha' must be a number" in p for p in error.problems)


@pytest.mark.parametrize("peft_type", ["ia3", "prompt_tuning", "prefix_tuning"])
def test_other_peft_types_import(registry: Registry, tiny_base: Path, tmp_path: Path, peft_type: str) -> None:
    adapter = build_lora_adapter(tiny_base, tmp_path / peft_type, peft_type=peft_type)
    record = registry.put_adapter(name=peft_type.replace("_", "-"), source_dir=adapter, base="tiny").record
    assert record.peft_type == peft_type.upper()


def test_dora_and_embedding_lora_import(registry: Registry, tiny_base: Path, tmp_path: Path) -> None:
    dora = build_lora_adapter(tiny_base, tmp_path / "dora", use_dora=True)
    assert registry.put_adapter(name="dora", source_dir=dora, base="tiny").record.peft_type == "LORA"
    emb = build_lora_adapter(tiny_base, tmp_path / "emb", target_modules=("embed_tokens", "q_proj"))
    assert registry.put_adapter(name="emb", source_dir=emb, base="tiny").created


def test_prompt_tuning_of_another_width_is_refused(registry: Registry, tiny_base_other: Path, tmp_path: Path) -> None:
    foreign = build_lora_adapter(tiny_base_other, tmp_path / "pt", peft_type="prompt_tuning")
    _assert_rejected(registry, foreign, "token_dim 96 differs")


def _classifier_of(base: Path, dest: Path, num_labels: int = 2) -> Path:
    """The base's body with a sequence-classification head, saved as transformers does."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=num_labels)
    model.save_pretrained(dest)
    return dest


def test_sequence_classifier_of_the_base_is_a_full_model(registry: Registry, tiny_base: Path, tmp_path: Path) -> None:
    record = registry.put_adapter(name="cls", source_dir=_classifier_of(tiny_base, tmp_path / "cls", 3), base="tiny").record
    assert record.is_full_model


def test_sequence_classifier_with_a_bad_head_or_body_is_refused(
    registry: Registry, tiny_base: Path, tiny_base_other: Path, tmp_path: Path
) -> None:
    bad_head = _classifier_of(tiny_base, tmp_path / "bad-head")
    tensors = load_file(bad_head / "model.safetensors")
    tensors["score.weight"] = np.zeros((2, 7), dtype=tensors["score.weight"].dtype)
    save_file(tensors, bad_head / "model.safetensors", metadata={"format": "pt"})
    _assert_rejected(registry, bad_head, "classification head 'score.weight' has width 7")
    _assert_rejected(registry, _classifier_of(tiny_base_other, tmp_path / "foreign"), "has shape")


# ---------------------------------------------------------------------------------------------
# Issue 11: files from outside the directory, pickles, malformed safetensors, configs that
# would make every request fail, and inputs that raised tracebacks instead of one error.


def _rewrite_config(directory: Path, **changes: object) -> Path:
    config = json.loads((directory / "adapter_config.json").read_text())
    config.update(changes)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def test_symlinks_leading_out_of_the_directory_are_refused_by_name(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    bad = _copy(lora_dir, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the adapter")
    (bad / "passwd").symlink_to("/etc/passwd")
    (bad / "environ").symlink_to("/proc/self/environ")
    (bad / "notes.txt").symlink_to(secret)
    (bad / "sub").mkdir()
    (bad / "sub" / "up.txt").symlink_to("../../secret.txt")
    error = _assert_rejected(registry, bad, "outside the directory")
    assert isinstance(error, ValidationError) and len(error.problems) == 4
    for name in ("passwd", "environ", "notes.txt", "sub/up.txt"):
        assert any(p.startswith(f"{name} is a symbolic link") for p in error.problems), name


def test_dangling_looping_and_directory_links_and_fifos_are_refused(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    import os

    bad = _copy(lora_dir, tmp_path)
    (bad / "gone").symlink_to(bad / "does-not-exist")
    (bad / "loop").symlink_to(bad / "loop")
    (bad / "folder").mkdir()
    (bad / "to-folder").symlink_to(bad / "folder")
    os.mkfifo(bad / "pipe")  # reading it would block the import forever
    error = _assert_rejected(registry, bad, "symbolic link")
    assert isinstance(error, ValidationError)
    assert sorted(p.split(" ")[0] for p in error.problems) == ["gone", "loop", "pipe", "to-folder"]


def test_a_link_to_a_file_inside_is_stored_as_that_file(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    linked = _copy(lora_dir, tmp_path)
    (linked / "ADAPTER.md").symlink_to("README.md")
    record = registry.put_adapter(name="linked", source_dir=linked, base="tiny").record
    out = registry.export(record.ref, tmp_path / "out")
    assert not (out / "ADAPTER.md").is_symlink()
    assert (out / "ADAPTER.md").read_bytes() == (lora_dir / "README.md").read_bytes()


def test_pickled_extra_files_are_skipped_and_reported(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    import pickle

    source = _copy(lora_dir, tmp_path)
    torch.save({"learning_rate": 1e-3}, source / "training_args.bin")
    torch.save({"state": {}}, source / "optimizer.pt")
    (source / "extra.pkl").write_bytes(pickle.dumps({"a": 1}))
    (source / "checkpoint").mkdir()
    (source / "checkpoint" / "rng_state").write_bytes(pickle.dumps([1, 2], protocol=4))  # a pickle by content
    torch.save({"x": 1}, source / "checkpoint" / "scheduler.state")  # torch's zip archive, any name
    (source / "training_metrics.json").write_text("{}")
    result = registry.put_adapter(name="extras", source_dir=source, base="tiny")
    assert result.skipped == ("checkpoint/rng_state", "checkpoint/scheduler.state", "extra.pkl", "optimizer.pt", "training_args.bin")
    assert set(result.record.files) == {"README.md", "adapter_config.json", "adapter_model.safetensors", "training_metrics.json"}


def test_a_base_model_with_a_link_out_of_its_directory_is_refused(registry: Registry, tiny_base: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(tiny_base, tmp_path / "model"))
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to("/etc/passwd")
    with pytest.raises(ValidationError, match="tokenizer.json is a symbolic link to /etc/passwd, outside the directory"):
        registry.add_base_model(name="linked", model_dir=model)
    assert [b.name for b in registry.list_base_models()] == ["tiny"]
    assert not (registry.models_dir / "linked").exists()


def _rewrite_header(weights: Path, edit: object, *, extra_data: int = 0, raw: bytes | None = None) -> None:
    """Rewrite a safetensors header in place (the data stays), `edit(header)` changing it."""
    import struct

    data = weights.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    if raw is None:
        edit(header)  # type: ignore[operator]
        raw = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length:] + b"\0" * extra_data)


def _first_two(header: dict) -> tuple[dict, dict]:
    entries = sorted((v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][0])
    return entries[0], entries[1]


def _overlap(header: dict) -> None:
    first, second = _first_two(header)
    second["data_offsets"] = [second["data_offsets"][0] - 4, second["data_offsets"][1] - 4]


def _gap(header: dict) -> None:
    first, _ = _first_two(header)  # one column fewer, consistently: its span now ends before the next begins
    first["shape"] = [first["shape"][0], first["shape"][1] - 1]
    first["data_offsets"] = [first["data_offsets"][0], first["data_offsets"][0] + 4 * first["shape"][0] * first["shape"][1]]


def _set(key: str, value: object) -> object:
    def edit(header: dict) -> None:
        _first_two(header)[0][key] = value
    return edit


@pytest.mark.parametrize(
    "edit, extra, match",
    [
        (_overlap, 0, "overlap another tensor"),
        (_gap, 0, "overlap another tensor, leave a gap"),
        (lambda h: None, 16, "16 bytes after its last tensor"),
        (lambda h: _first_two(h)[0].update(data_offsets=[float(x) for x in _first_two(h)[0]["data_offsets"]]), 0, "floating point"),
        (lambda h: _first_two(h)[0].update(shape=[float(x) for x in _first_two(h)[0]["shape"]]), 0, "floating point"),
        (lambda h: _first_two(h)[0].update(shape=[True, 256]), 0, "boolean"),
        (lambda h: _first_two(h)[0].update(shape=[-4, 64]), 0, "invalid value: integer `-4`"),
        (_set("data_offsets", "0,1024"), 0, "invalid type: string"),
        (_set("data_offsets", {"begin": 0}), 0, "invalid type: map"),
        (_set("dtype", "F33"), 0, "unknown variant `F33`"),
        (lambda h: _first_two(h)[0].update(shape=[4, 63]), 0, r"spans 1024 bytes, but F32 \[4, 63\] needs 1008"),
        (lambda h: h.update(__metadata__={"format": 1}), 0, "expected a string"),
    ],
)
def test_safetensors_whose_layout_safetensors_refuses_are_refused(
    registry: Registry, lora_dir: Path, tmp_path: Path, edit: object, extra: int, match: str
) -> None:
    from safetensors import SafetensorError

    bad = _copy(lora_dir, tmp_path)
    _rewrite_header(bad / "adapter_model.safetensors", edit, extra_data=extra)
    with pytest.raises(SafetensorError):  # what export and every loader would meet later
        load_file(bad / "adapter_model.safetensors")
    _assert_rejected(registry, bad, match)


def test_a_dtype_adapterhub_does_not_read_is_refused(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    bad = _copy(lora_dir, tmp_path)
    _rewrite_header(bad / "adapter_model.safetensors", lambda h: _first_two(h)[0].update(dtype="C64", shape=[4, 32]))
    _assert_rejected(registry, bad, "has dtype C64, which adapterhub does not read")


def test_deeply_nested_or_oversized_safetensors_headers_are_refused(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    from adapterhub.formats import MAX_HEADER_BYTES

    deep = _copy(lora_dir, tmp_path, "deep")
    _rewrite_header(deep / "adapter_model.safetensors", None, raw=b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}")
    _assert_rejected(registry, deep, "recursion limit exceeded")
    big = _copy(lora_dir, tmp_path, "big")
    _rewrite_header(big / "adapter_model.safetensors", None, raw=b" " * (MAX_HEADER_BYTES + 1))
    _assert_rejected(registry, big, f"header of {MAX_HEADER_BYTES + 1:,} bytes; adapterhub reads headers of at most 8 MiB")


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"lora_alpha": float("nan")}, "'lora_alpha' is nan in adapter_config.json; numbers must be finite"),
        ({"lora_alpha": float("inf")}, "'lora_alpha' is inf"),
        ({"lora_dropout": float("-inf")}, "'lora_dropout' is -inf"),
        ({"rank_pattern": {"q_proj": float("nan")}}, "'rank_pattern.q_proj' is nan"),
        ({"peft_type": "../../etc"}, "'peft_type' '../../etc' is not a kind the registry reads; known: LORA, IA3"),
        ({"peft_type": "lora"}, "PEFT spells it 'LORA'"),
        ({"peft_type": "LOHA"}, "'peft_type' 'LOHA' is not a kind"),
        ({"peft_type": 5}, "'peft_type' must be a string"),
        ({"r": True}, "'r' must be a positive integer"),
        ({"r": 0}, "'r' must be a positive integer"),
        ({"r": 2**40}, "'r' must be a positive integer \\(at most 2147483647\\)"),
        ({"lora_alpha": True}, "'lora_alpha' must be a number"),
        ({"lora_alpha": 10**400}, "'lora_alpha' must be a number"),  # an int no float holds
        ({"task_type": 5}, "'task_type' must be a string"),
        ({"use_dora": "yes"}, "'use_dora' must be true or false"),
        ({"target_modules": "(["}, "'target_modules' '\\(\\[' is not a valid regular expression"),
        ({"target_modules": ["q_proj", 5]}, "'target_modules' must be a list of module names or a regex string"),
        ({"rank_pattern": {"(": 4}}, "'rank_pattern' key '\\(' is not a valid regular expression"),
        ({"rank_pattern": {"q_proj": "four"}}, "'rank_pattern' values must be positive integers"),
        ({"alpha_pattern": [1]}, "'alpha_pattern' must be an object"),
        ({"modules_to_save": 5}, "'modules_to_save' must be a list of module names, got 5"),
        ({"modules_to_save": ["score("]}, "'modules_to_save' entry 'score\\(' is not valid in a regular expression"),
        ({"target_modules": "\\p{L}+"}, "is not a valid regular expression"),  # `regex` reads it, PEFT's `re` does not
        ({"layers_to_transform": "0"}, "'layers_to_transform' must be a layer index or a list of them"),
        ({"layers_to_transform": [0, -1]}, "'layers_to_transform' must be a layer index or a list of them"),
        ({"layers_to_transform": [0], "layers_pattern": 5}, "'layers_pattern' must be a name or a list of names"),
        ({"layers_to_transform": [0], "layers_pattern": ["layers", "(("]}, "'layers_pattern' '\\(\\(' is not valid"),
    ],
)
def test_config_values_that_would_fail_every_request_are_refused(
    registry: Registry, lora_dir: Path, tmp_path: Path, changes: dict, match: str
) -> None:
    bad = _rewrite_config(_copy(lora_dir, tmp_path), **changes)
    _assert_rejected(registry, bad, match)


def test_a_1e309_alpha_is_refused(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    bad = _copy(lora_dir, tmp_path)
    text = (bad / "adapter_config.json").read_text()
    (bad / "adapter_config.json").write_text(text.replace('"lora_alpha": 8.0', '"lora_alpha": 1e309'))
    _assert_rejected(registry, bad, "'lora_alpha' is inf")


def test_deeply_nested_and_oversized_configs_are_refused(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    from adapterhub.formats import MAX_CONFIG_BYTES

    deep = _copy(lora_dir, tmp_path, "deep")
    (deep / "adapter_config.json").write_text('{"peft_type": "LORA", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    _assert_rejected(registry, deep, "nested too deeply")
    nested = _rewrite_config(_copy(lora_dir, tmp_path, "nested"), loftq_config=json.loads("[" * 40 + "]" * 40))
    _assert_rejected(registry, nested, "nested more than 32 levels deep")
    big = _copy(lora_dir, tmp_path, "big")
    (big / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "pad": [{}] * (MAX_CONFIG_BYTES // 3)}))
    _assert_rejected(registry, big, r"adapter_config.json is [\d,]+ bytes; adapterhub reads config files of at most 1 MiB")


def test_a_full_model_with_a_malformed_config_is_refused(registry: Registry, tiny_base: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(tiny_base, tmp_path / "ft"))
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = 5
    config["hidden_size"] = "64"
    (model / "config.json").write_text(json.dumps(config))
    error = _assert_rejected(registry, model, "2 problems")
    assert isinstance(error, ValidationError)
    assert any("'architectures' must be a list" in p for p in error.problems)
    assert any("'hidden_size' must be a non-negative integer" in p for p in error.problems)


def test_a_zero_dimensional_lora_weight_is_a_problem_not_a_crash(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    bad = _copy(lora_dir, tmp_path)
    tensors = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = np.zeros((), dtype=np.float32)
    save_file(tensors, bad / "adapter_model.safetensors")
    _assert_rejected(registry, bad, r"has shape \[\]; a lora_A.weight is 2-dimensional")


@pytest.mark.parametrize("wildcard", ["%%%%%%%%", "________", "%", "tin_", "\\%%%%%%%%%"])
def test_wildcards_in_a_base_model_lookup_match_nothing(registry: Registry, wildcard: str) -> None:
    base = registry.get_base_model("tiny")
    with pytest.raises(NotFoundError):
        registry.get_base_model(wildcard)
    with pytest.raises(NotFoundError):
        registry.remove_base_model(wildcard)
    assert registry.get_base_model("tiny") == base and base.path.is_dir()


def test_removing_a_base_model_takes_its_exact_name_or_full_fingerprint(
    registry: Registry, tiny_base_other: Path
) -> None:
    other = registry.add_base_model(name="other", model_dir=tiny_base_other)
    assert registry.get_base_model(other.fingerprint[:8]).name == "other"  # prefixes still find it...
    with pytest.raises(NotFoundError, match="exact name or full fingerprint"):
        registry.remove_base_model(other.fingerprint[:8])  # ...but do not delete it
    assert other.path.is_dir()
    assert registry.remove_base_model(other.fingerprint).name == "other"
    assert not other.path.exists()


def test_a_fingerprint_prefix_two_bases_share_is_ambiguous(registry: Registry, tiny_base_other: Path) -> None:
    registry.add_base_model(name="other", model_dir=tiny_base_other)
    tiny = registry.get_base_model("tiny").fingerprint
    with registry.engine.begin() as conn:  # force a shared prefix: the lookup, not sha256, is under test
        conn.execute(sqlalchemy.text("UPDATE base_models SET fingerprint = :f WHERE name = 'other'"), {"f": tiny[:10] + "0" * 54})
    with pytest.raises(AmbiguousRefError, match="matches several base models"):
        registry.get_base_model(tiny[:10])
    assert registry.get_base_model(tiny[:11] if tiny[10] != "0" else tiny).name == "tiny"


def test_a_hugging_face_cache_snapshot_imports_through_its_blob_links(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--someone--lora"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for i, item in enumerate(sorted(lora_dir.iterdir())):  # the cache's layout: snapshot files link to ../../blobs/<hash>
        shutil.copy(item, repo / "blobs" / f"blob{i}")
        (snapshot / item.name).symlink_to(f"../../blobs/blob{i}")
    record = registry.put_adapter(name="cached", source_dir=snapshot, base="tiny").record
    assert set(record.files) == {p.name for p in lora_dir.iterdir()}
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    (snapshot / "main").symlink_to("../../refs/main")  # inside the repo cache, but not one of its blobs
    _assert_rejected(registry, snapshot, "main is a symbolic link to .*refs/main, outside the directory", name="cached2")


def test_weights_whose_first_bytes_read_like_a_pickle_are_still_stored(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    import struct

    source = _copy(lora_dir, tmp_path)
    weights = source / "adapter_model.safetensors"
    data = weights.read_bytes()
    # Pad the header (with spaces, as the format allows) to 0x0580 bytes: the file then opens with b"\x80\x05".
    (length,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + length].rstrip() + b" " * (0x0580 - len(data[8:8 + length].rstrip()))
    body = bytearray(struct.pack("<Q", len(header)) + header + data[8 + length:])
    body[-1] = ord(".")  # a pickle's STOP opcode ends it, too (the last float just changes value)
    weights.write_bytes(bytes(body))
    assert weights.read_bytes()[:2] == b"\x80\x05"
    result = registry.put_adapter(name="w", source_dir=source, base="tiny")
    assert "adapter_model.safetensors" in result.record.files and result.skipped == ()


@pytest.mark.parametrize(
    "changes, where",
    [
        ({"target_modules": r"(.|.)*_[kv]"}, "target_modules"),
        ({"rank_pattern": {r"(.|.)*_[kv]": 2}}, "rank_pattern key"),
        ({"alpha_pattern": {r"(.|.)*_[kv]": 2}}, "alpha_pattern key"),
    ],
)
def test_a_regex_that_backtracks_catastrophically_is_one_problem_not_a_hang(
    registry: Registry, lora_dir: Path, tmp_path: Path, changes: dict, where: str
) -> None:
    """With `re` these take 2^31 steps on every module name; the import must answer at once."""
    import time

    bad = _rewrite_config(_copy(lora_dir, tmp_path), **changes)
    started = time.monotonic()
    error = _assert_rejected(registry, bad, "backtracks catastrophically")
    assert time.monotonic() - started < 5
    assert isinstance(error, ValidationError) and len(error.problems) == 1
    assert error.problems[0].startswith(f"{where} '(.|.)*_[kv]' did not finish matching 'model.layers.0.self_attn.")


def test_peft_matching_rules_decide_which_tensors_belong(registry: Registry, lora_dir: Path, tmp_path: Path) -> None:
    """`exclude_modules` and `layers_to_transform` are PEFT's: a tensor of a module PEFT would not adapt is refused."""
    excluded = _rewrite_config(_copy(lora_dir, tmp_path, "excluded"), exclude_modules=["model.layers.1.self_attn.v_proj"])
    error = _assert_rejected(registry, excluded, "target_modules")
    assert isinstance(error, ValidationError) and len(error.problems) == 2  # its lora_A and lora_B
    layer_zero = _rewrite_config(_copy(lora_dir, tmp_path, "layer0"), layers_to_transform=[0], layers_pattern="layers")
    error = _assert_rejected(registry, layer_zero, "model.layers.1.self_attn")
    assert isinstance(error, ValidationError) and len(error.problems) == 4
    both = _rewrite_config(_copy(lora_dir, tmp_path, "both"), layers_to_transform=[0, 1], layers_pattern=["h", "layers"])
    assert registry.put_adapter(name="both", source_dir=both, base="tiny").created


def test_listing_by_an_unknown_kind_names_the_kinds(registry: Registry, lora_dir: Path) -> None:
    registry.put_adapter(name="a", source_dir=lora_dir, base="tiny")
    with pytest.raises(AdapterhubError, match="unknown adapter kind 'loha'; known kinds: lora, rslora, dora"):
        registry.list(peft_type="loha")
    assert [r.ref for r in registry.list(peft_type="LORA")] == [r.ref for r in registry.list(peft_type="lora")] == ["a:1"]
    assert registry.list(peft_type="full") == registry.list(peft_type="rslora") == []
