"""The core's Hub module with the real `huggingface_hub` client against the fake Hub on loopback.

Cards are built from plain inputs and read back with `ModelCard.load`; pushes and pulls go
through `HfApi` and `snapshot_download` over HTTP to `tests/hubserver.py`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import HFValidationError, validate_repo_id

from adapterhub.hub.card import CardInputs, EvaluationRow, ParentInfo, build_card, read_card
from adapterhub.hub.client import HubError, push_folder, pulled_repo
from adapterhub.hub.ids import hub_id_problems, parse_repo_spec
from tests.hubserver import OTHER_TOKEN, READ_TOKEN, TOKEN, FakeHub, client_env, client_settings, fake_hub, validate_metadata  # noqa: F401

BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
LORA_CONFIG = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def lora_inputs(**changes: object) -> CardInputs:
    fields: dict[str, object] = dict(
        repo_id="me/reverse", ref="reverse:2", sha256="ab" * 32, kind="lora", peft_type="LORA", task_type="CAUSAL_LM",
        config=LORA_CONFIG, base_name="smollm2", base_hub_id=BASE_ID, base_fingerprint="cd" * 32,
        files=("README.md", "adapter_config.json", "adapter_model.safetensors", "learning_curve.png", "training_metrics.json"),
        lineage_kind="trained",
        lineage_details={"dataset_fingerprint": "sha256:1234", "config": {"task": "sft", "method": "lora", "data": "/home/me/private/train.jsonl"}},
        evaluations=(
            EvaluationRow("exact_match", 0.25, "heldout.jsonl@sha256:abcdef123456"),
            EvaluationRow("exact_match", 0.875, "heldout.jsonl@sha256:abcdef123456"),  # the latest value wins
            EvaluationRow("perplexity", 3.125, "train.jsonl@sha256:0123456789ab", "validation"),
        ),
        tags=("demo",),
    )
    return CardInputs(**(fields | changes))  # type: ignore[arg-type]


def saved(card: ModelCard, tmp_path: Path) -> Path:
    path = tmp_path / "README.md"
    card.save(path)
    return path


# ------------------------------------------------------------------ ids


@pytest.mark.parametrize("text", ["me/reverse", "HuggingFaceTB/SmolLM2-135M-Instruct", "a/b", "org_1/x.y-z", "o/" + "n" * 96,
                                  "me/-x", "me/x-", "me/.x", "me/x..y", "me/x--y", "me/x.git", "/abs/path", "./rel", "a/b/c",
                                  "bare", "me/" + "n" * 97, "me/x y", "", "me/"])
def test_hub_ids_are_the_clients_repo_ids_with_an_owner(text: str) -> None:
    try:
        validate_repo_id(text)
        client_accepts = bool(text) and "/" in text and not text.endswith("/")
    except HFValidationError:
        client_accepts = False
    assert (hub_id_problems(text) == []) == client_accepts, hub_id_problems(text)


def test_a_repo_spec_may_name_a_revision_and_a_path_is_named_as_one() -> None:
    assert parse_repo_spec("me/reverse") == ("me/reverse", None)
    assert parse_repo_spec("me/reverse@refs/pr/1") == ("me/reverse", "refs/pr/1")
    assert "is a local path" in hub_id_problems("/home/me/models/tiny")[0]
    with pytest.raises(Exception, match="the revision after '@'"):
        parse_repo_spec("me/reverse@")


# ------------------------------------------------------------------ cards


def test_an_adapter_card_validates_on_the_hub_and_reads_back(tmp_path: Path) -> None:
    card = build_card(lora_inputs())
    assert validate_metadata(str(card)) == []
    loaded = ModelCard.load(saved(card, tmp_path))
    data = loaded.data
    assert data.base_model == BASE_ID and data.base_model_relation == "adapter"
    assert data.library_name == "peft" and data.pipeline_tag == "text-generation"
    assert data.tags == ["adapterhub", "lora", f"base_model:adapter:{BASE_ID}", "demo"]
    assert [(r.metric_type, r.metric_value, r.dataset_name, r.dataset_split) for r in data.eval_results] == [
        ("exact_match", 0.875, "heldout.jsonl@sha256:abcdef123456", None),
        ("perplexity", 3.125, "train.jsonl@sha256:0123456789ab", "validation"),
    ]
    assert data["adapterhub"]["ref"] == "reverse:2" and data["adapterhub"]["base_fingerprint"] == "cd" * 32
    text = loaded.text
    assert "training data fingerprint: `sha256:1234`".lower() in text.lower()
    assert "PeftModel.from_pretrained(base, \"me/reverse\")" in text
    assert f"vllm serve {BASE_ID} --enable-lora --max-lora-rank 8 --lora-modules reverse=me/reverse" in text
    assert "adapterhub pull me/reverse --name reverse" in text and "adapterhub serve --base smollm2" in text
    assert "![learning curve](learning_curve.png)" in text
    assert "/home/me/private" not in str(card) and "`train.jsonl`" in text  # a local path is shown by file name
    info = read_card(saved(card, tmp_path))
    assert info.base_models == (BASE_ID,) and info.relation == "adapter"


def test_the_same_record_makes_the_same_card_bytes() -> None:
    assert str(build_card(lora_inputs())) == str(build_card(lora_inputs()))


def test_a_merge_names_every_published_parent_else_the_base(tmp_path: Path) -> None:
    merged = dict(lineage_kind="merged", lineage_details={"method": "ties", "recipe": {"merge_method": "ties", "models": [{"model": "a:1"}]}})
    published = lora_inputs(parents=(ParentInfo("a:1", "me/a"), ParentInfo("b:3", "team/b")), **merged)
    card = build_card(published)
    assert validate_metadata(str(card)) == []
    data = ModelCard.load(saved(card, tmp_path)).data
    assert data.base_model == ["me/a", "team/b"] and data.base_model_relation == "merge"
    assert "base_model:merge:me/a" in data.tags and "base_model:merge:team/b" in data.tags
    assert "| `b` | 3 | [team/b](https://huggingface.co/team/b) |" in card.text and "merge_method: ties" in card.text
    assert read_card(saved(card, tmp_path)).base_models == (BASE_ID, "me/a", "team/b")  # the base first, for a pull
    partial = build_card(lora_inputs(parents=(ParentInfo("a:1", "me/a"), ParentInfo("b:3", None)), **merged))
    assert partial.data.base_model == BASE_ID and partial.data.base_model_relation == "adapter"
    assert "| `b` | 3 | not published |" in partial.text


def test_a_full_model_card_is_for_transformers(tmp_path: Path) -> None:
    card = build_card(lora_inputs(kind="full", peft_type="FULL", task_type=None, config={"architectures": ["LlamaForCausalLM"]},
                                  files=("config.json", "model.safetensors", "tokenizer.json")))
    assert validate_metadata(str(card)) == []
    assert card.data.library_name == "transformers" and card.data.base_model_relation == "finetune"
    assert "lora" not in card.data.tags and "AutoModelForCausalLM.from_pretrained(\"me/reverse\")" in card.text
    assert "PeftModel" not in card.text and "vllm serve me/reverse" in card.text


def test_a_dora_card_says_why_vllm_cannot_serve_it_and_a_classifier_is_text_classification() -> None:
    dora = build_card(lora_inputs(kind="dora", config=LORA_CONFIG | {"use_dora": True}))
    assert "vLLM cannot serve this adapter: vLLM does not yet support DoRA" in dora.text and "--lora-modules" not in dora.text
    assert "dora" in dora.data.tags
    classifier = build_card(lora_inputs(task_type="SEQ_CLS", config=LORA_CONFIG | {"task_type": "SEQ_CLS"}))
    assert classifier.data.pipeline_tag == "text-classification" and "AutoModelForSequenceClassification" in classifier.text


def test_a_pulled_card_is_read_without_trusting_its_types(tmp_path: Path) -> None:
    path = tmp_path / "README.md"
    path.write_text("---\nbase_model: [7, org/real]\ntags: oops\nbase_model_relation: [x]\nmodel-index: 3\n---\nhello\n")
    info = read_card(path)
    assert info.base_models == ("org/real",) and info.tags == ("oops",) and info.relation is None and info.eval_results == ()
    path.write_text("---\nbase_model: [unclosed\n---\n")
    with pytest.raises(ValueError, match="its metadata is not YAML"):
        read_card(path)


def test_a_card_whose_base_model_is_a_path_fails_the_hubs_validation() -> None:
    card = build_card(lora_inputs(base_hub_id="/home/me/models/tiny"))
    assert any('"base_model" with value "/home/me/models/tiny" is not valid' in e for e in validate_metadata(str(card)))


# ------------------------------------------------------------------ push and pull


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """A directory as a push hands it over: a card, a config, LFS-sized weights and a PNG."""
    out = tmp_path / "folder"
    out.mkdir()
    build_card(lora_inputs(repo_id="me/rev")).save(out / "README.md")
    (out / "adapter_config.json").write_text(json.dumps(LORA_CONFIG))
    (out / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4096)  # 1 MiB, LFS by .gitattributes
    (out / "learning_curve.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + b"\1" * 64)
    return out


def test_a_push_creates_the_repo_and_a_repush_makes_no_commit(fake_hub: FakeHub, folder: Path, tmp_path: Path) -> None:
    sent: list[tuple[int, int]] = []
    with client_settings(client_env(fake_hub, tmp_path / "hf")):
        first = push_folder(folder, repo_id="me/rev", message="first", progress=lambda done, total: sent.append((done, total)))
        assert first.created and first.revision == "main" and first.commit_sha == fake_hub.head("me/rev")
        files = fake_hub.files("me/rev")
        assert {p: files[p] for p in files if p != ".gitattributes"} == {p.name: p.read_bytes() for p in folder.iterdir()}
        total = sum(p.stat().st_size for p in folder.iterdir())
        assert sent[-1] == (total, total) and any(0 < done < total for done, _ in sent)  # the weights went up in chunks
        puts, commits = fake_hub.requested("PUT", "/lfs-storage/"), fake_hub.requested("POST", "/commit/")
        again = push_folder(folder, repo_id="me/rev", message="again")
        assert not again.created and again.commit_sha == first.commit_sha
        assert fake_hub.requested("PUT", "/lfs-storage/") == puts and fake_hub.requested("POST", "/commit/") == commits
        assert len(fake_hub.history("me/rev")) == 2  # the repo's initial commit and the push


def test_a_push_leaves_the_revision_holding_exactly_the_folder(fake_hub: FakeHub, folder: Path, tmp_path: Path) -> None:
    with client_settings(client_env(fake_hub, tmp_path / "hf")):
        push_folder(folder, repo_id="me/rev", message="first", private=True)
        assert fake_hub.repos["me/rev"].private
        (folder / "learning_curve.png").unlink()
        (folder / "adapter_config.json").write_text(json.dumps(LORA_CONFIG | {"r": 8}))
        second = push_folder(folder, repo_id="me/rev", message="second")
    assert second.created and second.deleted == ("learning_curve.png",)
    files = fake_hub.files("me/rev")
    assert set(files) == {".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert json.loads(files["adapter_config.json"])["r"] == 8


def test_a_branch_is_created_and_a_pull_request_targets_one(fake_hub: FakeHub, folder: Path, tmp_path: Path) -> None:
    with client_settings(client_env(fake_hub, tmp_path / "hf")):
        push_folder(folder, repo_id="me/rev", message="main")
        on_branch = push_folder(folder, repo_id="me/rev", message="dev", revision="dev")
        assert not on_branch.created and fake_hub.head("me/rev", "dev") == fake_hub.head("me/rev")  # same content as main
        (folder / "adapter_config.json").write_text(json.dumps(LORA_CONFIG | {"r": 2}))
        main_before = fake_hub.head("me/rev")
        pr = push_folder(folder, repo_id="me/rev", message="proposal", create_pr=True)
        assert pr.created and pr.revision == "refs/pr/1" and pr.pr_url.endswith("/me/rev/discussions/1")
        assert fake_hub.head("me/rev") == main_before and fake_hub.head("me/rev", "refs/pr/1") == pr.commit_sha
        against_dev = push_folder(folder, repo_id="me/rev", message="proposal for dev", create_pr=True, revision="dev")
        assert against_dev.revision == "refs/pr/2"
        assert fake_hub.history("me/rev", "refs/pr/2")[1].sha == fake_hub.head("me/rev", "dev")
        with pytest.raises(HubError, match=r"cannot push to me/rev@nope: me/rev has no revision 'nope'"):
            push_folder(folder, repo_id="me/rev", message="x", create_pr=True, revision="nope")


@pytest.mark.parametrize(
    "token, repo, message",
    [
        (None, "me/rev", "no Hugging Face token; log in with `hf auth login` or set HF_TOKEN"),
        ("hf_not_a_token", "me/rev", "refused the token (401: Invalid credentials in Authorization header)"),
        (READ_TOKEN, "me/rev", "the token has no write access there (403"),
        (TOKEN, "stranger/rev", "the token has no write access there (403"),
    ],
)
def test_push_without_the_right_token_is_one_line(fake_hub: FakeHub, folder: Path, tmp_path: Path, token: str | None,
                                                   repo: str, message: str) -> None:
    with client_settings(client_env(fake_hub, tmp_path / "hf", token=token)), pytest.raises(HubError) as caught:
        push_folder(folder, repo_id=repo, message="x")
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"cannot push to {repo}")
    assert repo not in fake_hub.repos


def test_the_hub_refusing_the_card_is_one_line(fake_hub: FakeHub, folder: Path, tmp_path: Path) -> None:
    build_card(lora_inputs(repo_id="me/rev", base_hub_id="/home/me/models/tiny")).save(folder / "README.md")
    with client_settings(client_env(fake_hub, tmp_path / "hf")), pytest.raises(HubError) as caught:
        push_folder(folder, repo_id="me/rev", message="x")
    assert 'refused the model card\'s metadata: "base_model" with value "/home/me/models/tiny" is not valid' in str(caught.value)
    assert fake_hub.requested("POST", "/commit/") == 0


@pytest.mark.parametrize("fault, message", [("drop", "failed mid-way (RemoteProtocolError"), ("stall", "timed out mid-way (ReadTimeout")])
def test_a_network_failure_or_time_out_mid_push_is_one_line(fake_hub: FakeHub, folder: Path, tmp_path: Path, fault: str, message: str) -> None:
    fake_hub.fail("POST", r"/api/models/me/rev/commit/", fault)
    with client_settings(client_env(fake_hub, tmp_path / "hf", HF_HUB_DOWNLOAD_TIMEOUT="1")), pytest.raises(HubError) as caught:
        push_folder(folder, repo_id="me/rev", message="x")
    assert message in str(caught.value) and "run the command again" in str(caught.value)
    assert len(fake_hub.history("me/rev")) == 1  # the repo exists, the commit never landed


def test_a_commit_racing_another_is_refused_not_merged(fake_hub: FakeHub, folder: Path, tmp_path: Path) -> None:
    with client_settings(client_env(fake_hub, tmp_path / "hf")):
        push_folder(folder, repo_id="me/rev", message="first")
        (folder / "adapter_config.json").write_text(json.dumps(LORA_CONFIG | {"r": 2}))
        fake_hub.fail("POST", r"/commit/main", lambda: fake_hub.seed("me/rev", {"notes.txt": b"someone else"}))
        with pytest.raises(HubError, match="the branch changed while pushing .*; run the push again"):
            push_folder(folder, repo_id="me/rev", message="second")
    assert fake_hub.history("me/rev")[0].message == "upload"  # the other writer's commit stands alone


def test_offline_mode_is_named(fake_hub: FakeHub, folder: Path, tmp_path: Path) -> None:
    with client_settings(client_env(fake_hub, tmp_path / "hf", HF_HUB_OFFLINE="1")), pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
        push_folder(folder, repo_id="me/rev", message="x")


def test_a_pull_downloads_one_commit_and_removes_it(fake_hub: FakeHub, folder: Path, tmp_path: Path) -> None:
    with client_settings(client_env(fake_hub, tmp_path / "hf")):
        pushed = push_folder(folder, repo_id="me/rev", message="first")
        with pulled_repo("me/rev") as pulled:
            assert pulled.commit_sha == pushed.commit_sha and pulled.revision == "main"
            got = {p.name: p.read_bytes() for p in pulled.path.iterdir()}
            assert got == {p.name: p.read_bytes() for p in folder.iterdir()}  # no .gitattributes
            assert pulled.card is not None and pulled.card.base_models == (BASE_ID,)
            download = pulled.path
        assert not download.exists()
        with pulled_repo("me/rev", pushed.commit_sha) as by_sha:
            assert by_sha.commit_sha == pushed.commit_sha
    assert not (tmp_path / "hf" / "hub").exists()  # the user's cache is not used


@pytest.mark.parametrize(
    "setup, token, revision, message",
    [
        ("none", TOKEN, None, "the repo does not exist on"),
        ("public", TOKEN, "v9", "me/rev has no revision 'v9'"),
        ("private", None, None, "or it is private and the token cannot read it"),
        ("private", OTHER_TOKEN, None, "or it is private and the token cannot read it"),
        ("gated", None, None, "the repo is gated; request access on"),
        ("gated", OTHER_TOKEN, None, "the repo is gated; request access on"),
    ],
)
def test_a_pull_that_cannot_read_the_repo_is_one_line(fake_hub: FakeHub, tmp_path: Path, setup: str, token: str | None,
                                                       revision: str | None, message: str) -> None:
    if setup != "none":
        fake_hub.seed("me/rev", {"adapter_config.json": b"{}"}, private=setup == "private", gated=setup == "gated")
    with client_settings(client_env(fake_hub, tmp_path / "hf", token=token)), pytest.raises(HubError) as caught:
        with pulled_repo("me/rev", revision):
            pass
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_an_empty_repo_is_named_as_one(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.create_repo("me/empty")  # only the Hub's .gitattributes
    with client_settings(client_env(fake_hub, tmp_path / "hf")), pytest.raises(HubError, match="the repo holds no files at commit"):
        with pulled_repo("me/empty"):
            pass


def test_a_granted_token_pulls_a_gated_repo(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.seed("me/rev", {"adapter_config.json": b"{}"}, gated=True)
    fake_hub.repos["me/rev"].granted.add(OTHER_TOKEN)
    with client_settings(client_env(fake_hub, tmp_path / "hf", token=OTHER_TOKEN)), pulled_repo("me/rev") as pulled:
        assert pulled.gated and (pulled.path / "adapter_config.json").read_bytes() == b"{}"


@pytest.mark.parametrize("method, path, fault, message", [
    ("GET", r"/resolve/.*/weights.safetensors", "truncate", "failed mid-way"),
    ("GET", r"/api/models/me/rev/revision/", "stall", "timed out mid-way"),
])
def test_a_network_failure_or_time_out_mid_pull_is_one_line_and_leaves_nothing(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, path: str, fault: str, message: str,
) -> None:
    fake_hub.seed("me/rev", {"adapter_config.json": b"{}", "weights.safetensors": b"\0" * 200_000})
    fake_hub.fail(method, path, fault, times=None)
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr("tempfile.tempdir", None)
    with client_settings(client_env(fake_hub, tmp_path / "hf", HF_HUB_DOWNLOAD_TIMEOUT="1")), pytest.raises(HubError) as caught:
        with pulled_repo("me/rev"):
            pass
    assert message in str(caught.value) and "run the command again" in str(caught.value)
    assert list(temp.iterdir()) == []


def test_the_push_folder_is_not_changed(fake_hub: FakeHub, folder: Path, tmp_path: Path) -> None:
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    copy = shutil.copytree(folder, tmp_path / "copy")
    with client_settings(client_env(fake_hub, tmp_path / "hf")):
        push_folder(Path(copy), repo_id="me/rev", message="x")
    assert {p.name: p.read_bytes() for p in Path(copy).iterdir()} == before
