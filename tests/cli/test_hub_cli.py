"""`adapterhub push` and `pull` as a user runs them: the console entry point, the real Hugging Face
client, the fake Hub on loopback (`tests/hubserver.py`), a real registry and real PEFT adapters."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from adapterhub.registry import Lineage, Registry
from tests.cli.test_registry_cli import assert_one_line_error
from tests.hubserver import OTHER_TOKEN, TOKEN, FakeHub, client_env, fake_hub  # noqa: F401
from tests.registry.conftest import make_variant, registry_state

BASE_ID = "org/tiny-llama"
DATASET = "heldout.jsonl@sha256:abcdef123456"


class Cli:
    """Runs `adapterhub` in a subprocess with one ADAPTERHUB_HOME and the client pointed at the fake Hub."""

    def __init__(self, home: Path, hub: FakeHub, tmp_path: Path) -> None:
        self.home, self.hub = home, hub
        self.temp = tmp_path / "temp"  # TMPDIR of every run: empty again after each one
        self.temp.mkdir(exist_ok=True)
        self.env = client_env(hub, tmp_path / "hf-home")

    def __call__(self, *args: str, **env: str | None) -> subprocess.CompletedProcess[str]:
        full = os.environ | {"ADAPTERHUB_HOME": str(self.home), "COLUMNS": "200", "TMPDIR": str(self.temp)} | self.env
        full = {k: v for k, v in (full | env).items() if v is not None}
        full.pop("ADAPTERHUB_DATABASE_URL", None)
        result = subprocess.run([sys.executable, "-m", "adapterhub.cli.main", *args], capture_output=True, text=True, env=full, timeout=300)
        assert list(self.temp.iterdir()) == [], f"left behind: {list(self.temp.iterdir())}"
        return result

    def ok(self, *args: str, **env: str | None) -> subprocess.CompletedProcess[str]:
        result = self(*args, **env)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    def json(self, *args: str) -> object:
        return json.loads(self.ok(*args, "--json").stdout)


@pytest.fixture()
def cli(tmp_path: Path, tiny_base: Path, fake_hub: FakeHub) -> Cli:  # noqa: F811 - the fixture is imported above
    runner = Cli(tmp_path / "home", fake_hub, tmp_path)
    runner.ok("models", "add", "tiny", str(tiny_base), "--hub-id", BASE_ID)
    return runner


def trained_record(home: Path, lora_dir: Path, tmp_path: Path, name: str = "rev", seed: int | None = None) -> str:
    """A record as `adapterhub train` leaves one: learning curve, metrics, lineage and evaluations."""
    from adapterhub.train.progress import plot_learning_curve, write_metrics

    out = tmp_path / f"{name}-src-{seed}"
    source = make_variant(lora_dir, out, seed) if seed is not None else Path(shutil.copytree(lora_dir, out))
    plot_learning_curve({"train_loss": [[1, 2.0], [2, 1.5], [3, 1.2]]}, source / "learning_curve.png", title=name)
    write_metrics({"train_loss": 1.2, "labels": None}, source)
    details = {"dataset_fingerprint": "sha256:feedbeef", "config": {"task": "sft", "method": "lora", "data": str(tmp_path / "train.jsonl")},
               "metrics": {"train_loss": 1.2}}
    with Registry.open(home) as registry:
        record = registry.put_adapter(name=name, source_dir=source, base="tiny", lineage=Lineage(kind="trained", details=details)).record
        registry.record_evaluation(record.ref, metric="exact_match", value=0.875, dataset=DATASET)
        registry.record_evaluation(record.ref, metric="perplexity", value=3.25, dataset=DATASET, split="validation")
    return record.ref


def card_of(hub: FakeHub, repo: str, tmp_path: Path, revision: str = "main") -> ModelCard:
    path = tmp_path / "card" / "README.md"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(hub.files(repo, revision)["README.md"])
    return ModelCard.load(path)


def test_push_publishes_the_record_with_its_card_and_a_repush_makes_no_commit(cli: Cli, lora_dir: Path, tmp_path: Path) -> None:
    ref = trained_record(cli.home, lora_dir, tmp_path)
    pushed = cli.ok("push", ref, "--repo", "me/reverse")
    assert "pushed rev:1 to me/reverse@main: commit" in pushed.stdout
    cli.ok("export", ref, str(tmp_path / "exported"))
    stored = {p.name: p.read_bytes() for p in (tmp_path / "exported").iterdir()}
    files = cli.hub.files("me/reverse")
    assert set(files) == {".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors", "learning_curve.png", "training_metrics.json"}
    for name in ("adapter_model.safetensors", "learning_curve.png", "training_metrics.json"):
        assert files[name] == stored[name], name
    # The published config names the base by its Hub id, not by the author's local path (PEFT's push does the same).
    published_config, stored_config = json.loads(files["adapter_config.json"]), json.loads(stored["adapter_config.json"])
    assert published_config["base_model_name_or_path"] == BASE_ID
    assert published_config | {"base_model_name_or_path": None} == stored_config | {"base_model_name_or_path": None}
    assert str(tmp_path) not in files["adapter_config.json"].decode()
    card = card_of(cli.hub, "me/reverse", tmp_path)
    assert card.data.base_model == BASE_ID and card.data.library_name == "peft" and card.data.base_model_relation == "adapter"
    assert {"adapterhub", "lora", f"base_model:adapter:{BASE_ID}"} <= set(card.data.tags)
    shown = cli.json("show", ref)
    registry_evals = sorted((e["metric"], e["value"], e["dataset"], e["split"]) for e in shown["evaluations"])
    card_evals = sorted((r.metric_type, r.metric_value, r.dataset_name, r.dataset_split) for r in card.data.eval_results)
    assert card_evals == registry_evals
    assert "sha256:feedbeef" in card.text and str(tmp_path) not in str(card)
    assert shown["hub"][0] | {"created_at": None} == {
        "direction": "push", "endpoint": cli.hub.url, "repo_id": "me/reverse", "revision": "main",
        "commit_sha": cli.hub.head("me/reverse"), "pr_url": None, "created_at": None,
    }
    assert f"hub: pushed to me/reverse@main (commit {cli.hub.head('me/reverse')[:12]}) on {cli.hub.url}" in cli.ok("show", ref).stdout

    commits, uploads = len(cli.hub.history("me/reverse")), cli.hub.requested("PUT", "/lfs-storage/")
    again = cli.ok("push", ref, "--repo", "me/reverse")
    assert "me/reverse@main already holds identical content" in again.stdout and "no commit made" in again.stdout
    assert len(cli.hub.history("me/reverse")) == commits and cli.hub.requested("PUT", "/lfs-storage/") == uploads
    assert len(cli.json("show", ref)["hub"]) == 1  # the same commit is one push record


def test_pull_round_trips_byte_identical_and_twice_is_one_record(cli: Cli, lora_dir: Path, tmp_path: Path, tiny_base: Path) -> None:
    ref = trained_record(cli.home, lora_dir, tmp_path)
    cli.ok("push", ref, "--repo", "me/reverse")
    other = Cli(tmp_path / "other-home", cli.hub, tmp_path)  # another user's registry with the same base
    other.ok("models", "add", "mine", str(tiny_base), "--hub-id", "ORG/Tiny-Llama")  # Hub ids compare without case
    pulled = other.ok("pull", "me/reverse")
    commit = cli.hub.head("me/reverse")
    assert f"pulled me/reverse@main (commit {commit[:12]}) as reverse:1 (lora r=4 on mine" in pulled.stdout
    other.ok("export", "reverse", str(tmp_path / "pulled"))
    cli.ok("export", ref, str(tmp_path / "original"))
    for name in ("adapter_model.safetensors", "learning_curve.png", "training_metrics.json"):
        assert (tmp_path / "pulled" / name).read_bytes() == (tmp_path / "original" / name).read_bytes(), name
    for name in ("README.md", "adapter_config.json"):  # as published
        assert (tmp_path / "pulled" / name).read_bytes() == cli.hub.files("me/reverse")[name], name
    shown = other.json("show", "reverse")
    assert shown["lineage"]["kind"] == "imported"
    details = shown["lineage"]["details"]
    assert (details["repo"], details["revision"], details["commit"]) == ("me/reverse", "main", commit)
    assert [(t["direction"], t["repo_id"], t["commit_sha"]) for t in shown["hub"]] == [("pull", "me/reverse", commit)]
    again = other.ok("pull", "me/reverse")
    assert "identical content is already registered as reverse:1" in again.stdout
    assert [r["ref"] for r in other.json("list")] == ["reverse:1"] and len(other.json("show", "reverse")["hub"]) == 1


def test_create_pr_opens_a_pull_request_revision_and_leaves_main(cli: Cli, lora_dir: Path, tmp_path: Path) -> None:
    trained_record(cli.home, lora_dir, tmp_path)
    cli.ok("push", "rev:1", "--repo", "me/reverse")
    main = cli.hub.head("me/reverse")
    second = trained_record(cli.home, lora_dir, tmp_path, seed=5)
    assert second == "rev:2"
    opened = cli.json("push", "rev:2", "--repo", "me/reverse", "--create-pr", "--message", "Try rev:2")
    assert opened["created"] and opened["revision"] == "refs/pr/1" and opened["pr_url"].endswith("/me/reverse/discussions/1")
    assert cli.hub.head("me/reverse") == main and cli.hub.history("me/reverse", "refs/pr/1")[0].message == "Try rev:2"
    assert cli.json("show", "rev:2")["hub"][0]["revision"] == "refs/pr/1"
    cli.ok("pull", "me/reverse@refs/pr/1", "--name", "proposal")
    cli.ok("export", "proposal", str(tmp_path / "proposal"))
    cli.ok("export", "rev:2", str(tmp_path / "rev2"))
    weights = "adapter_model.safetensors"
    assert (tmp_path / "proposal" / weights).read_bytes() == (tmp_path / "rev2" / weights).read_bytes()
    assert "pull request" in cli.ok("show", "rev:2").stdout


def test_a_merge_card_names_its_parents_by_the_repos_they_were_pushed_to(cli: Cli, lora_dir: Path, tmp_path: Path, tiny_base: Path) -> None:
    trained_record(cli.home, lora_dir, tmp_path, name="a")
    trained_record(cli.home, lora_dir, tmp_path, name="b", seed=3)
    cli.ok("push", "a", "--repo", "me/a")
    cli.ok("push", "b", "--repo", "team/b")
    with Registry.open(cli.home) as registry:  # a merge's record, as `adapterhub merge` writes it
        registry.put_adapter(name="ab", source_dir=make_variant(lora_dir, tmp_path / "ab", 11), base="tiny", lineage=Lineage(
            kind="merged", parents=("a:1", "b:1"), details={"method": "ties", "recipe": {"merge_method": "ties", "models": [{"model": "a:1"}, {"model": "b:1"}]}},
        ))
    cli.ok("push", "ab", "--repo", "me/ab")
    card = card_of(cli.hub, "me/ab", tmp_path)
    assert card.data.base_model == ["me/a", "team/b"] and card.data.base_model_relation == "merge"
    assert "merge_method: ties" in card.text
    other = Cli(tmp_path / "other", cli.hub, tmp_path)
    other.ok("models", "add", "tiny", str(tiny_base), "--hub-id", BASE_ID)
    assert "as ab:1" in other.ok("pull", "me/ab").stdout  # the card's adapterhub block names the real base


def test_a_full_model_pushes_its_shards_config_and_tokenizer(cli: Cli, tiny_base: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.01)
    model.save_pretrained(tmp_path / "ft", max_shard_size="300KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_base / name, tmp_path / "ft" / name)
    cli.ok("import", str(tmp_path / "ft"), "--name", "ft", "--base", "tiny")
    cli.ok("push", "ft", "--repo", "me/ft")
    files = cli.hub.files("me/ft")
    shards = [name for name in files if name.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files and {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    card = card_of(cli.hub, "me/ft", tmp_path)
    assert card.data.library_name == "transformers" and card.data.base_model == BASE_ID


def test_the_upload_bar_shows_only_once_an_upload_takes_more_than_a_moment(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from adapterhub.cli import hub

    monkeypatch.setattr(hub, "PROGRESS_DELAY_S", 0.05)
    with hub._UploadProgress("quick", 10) as quick:
        quick(10, 10)
    assert not quick._shown
    with hub._UploadProgress("slow", 10) as slow:
        slow(3, 10)
        time.sleep(0.3)
        assert slow._shown and slow._progress.tasks[0].completed == 3
    assert slow._progress.live.is_started is False


# ------------------------------------------------------------------ refusals: one line, exit 1, nothing changed


def state(cli: Cli) -> object:
    """Everything a command could change: records, blobs, temp files, and each record's push/pull records."""
    with Registry.open(cli.home) as registry:
        return registry_state(registry), {r.ref: registry.get(r.ref).hub for r in registry.list()}


def assert_untouched(cli: Cli, before: object) -> None:
    assert state(cli) == before


def test_push_of_an_adapter_whose_base_has_no_hub_id_is_refused_naming_hub_id(cli: Cli, lora_dir: Path, tiny_base_other: Path, tmp_path: Path) -> None:
    from tests.conftest import build_lora_adapter

    cli.ok("models", "add", "plain", str(tiny_base_other))
    cli.ok("import", str(build_lora_adapter(tiny_base_other, tmp_path / "plain-lora")), "--name", "p", "--base", "plain")
    before = state(cli)
    result = cli("push", "p", "--repo", "me/p")
    assert_one_line_error(result, "its base model 'plain' has no Hub id")
    assert "`adapterhub models add plain --hub-id ORG/NAME`" in result.stderr
    assert cli.hub.requests == [] and "me/p" not in cli.hub.repos
    assert_untouched(cli, before)
    assert "its Hub id is now team/plain" in cli.ok("models", "add", "plain", "--hub-id", "team/plain").stdout
    assert cli.json("models", "show", "plain")["hub_id"] == "team/plain"
    assert "team/plain" in cli.ok("models", "list").stdout and "hub id team/plain" in cli.ok("models", "show", "plain").stdout


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["push", "rev", "--repo", "/tmp/me/rev"], {}, "is a local path, not a Hub id"),
        (["push", "nope", "--repo", "me/rev"], {}, "no adapter named 'nope'"),
        (["push", "rev", "--repo", "me/rev"], {"HF_TOKEN": None}, "no Hugging Face token; log in with `hf auth login` or set HF_TOKEN"),
        (["push", "rev", "--repo", "me/rev"], {"HF_TOKEN": "hf_wrong"}, "refused the token (401"),
        (["push", "rev", "--repo", "stranger/rev"], {}, "the token has no write access there (403"),
        (["push", "rev", "--repo", "me/rev", "--create-pr", "--revision", "nope"], {}, "me/rev has no revision 'nope'"),
        (["pull", "me/missing"], {}, "cannot pull me/missing: the repo does not exist on"),
        (["pull", "me/public@v2"], {}, "me/public has no revision 'v2'"),
        (["pull", "me/gated"], {"HF_TOKEN": OTHER_TOKEN}, "cannot pull me/gated: the repo is gated; request access on"),
        (["pull", "me/private"], {"HF_TOKEN": None}, "or it is private and the token cannot read it"),
        (["pull", "me/public", "--base", "tinny"], {}, "no base model named 'tinny'; did you mean: tiny?"),
        (["pull", "me/unknown-base"], {}, "is for someone/else, and no registered base model has that Hub id"),
        (["pull", "me/no-card"], {}, "me/no-card has no model card naming its base_model; pass --base"),
        (["pull", "me/pickled"], {}, "pickled weights adapter_model.bin are refused"),
        (["pull", "me/bad-card"], {}, "its model card (README.md) does not parse: its metadata is not YAML"),
        (["pull", "me/public", "--name", "a/b"], {}, "contains a path separator"),
        (["models", "add", "tiny", "--hub-id", "./tiny"], {}, "is a local path, not a Hub id"),
    ],
)
def test_refusals_are_one_line_exit_1_and_change_nothing(cli: Cli, lora_dir: Path, tmp_path: Path, args: list[str],
                                                         env: dict[str, str | None], message: str) -> None:
    trained_record(cli.home, lora_dir, tmp_path)
    config, weights = (lora_dir / "adapter_config.json").read_bytes(), (lora_dir / "adapter_model.safetensors").read_bytes()
    card = f"---\nbase_model: {BASE_ID}\n---\n".encode()
    cli.hub.seed("me/public", {"README.md": card, "adapter_config.json": config, "adapter_model.safetensors": weights})
    cli.hub.seed("me/gated", {"README.md": card, "adapter_config.json": config}, gated=True)
    cli.hub.seed("me/private", {"README.md": card, "adapter_config.json": config}, private=True)
    cli.hub.seed("me/unknown-base", {"README.md": b"---\nbase_model: someone/else\n---\n", "adapter_config.json": config,
                                     "adapter_model.safetensors": weights})
    cli.hub.seed("me/no-card", {"adapter_config.json": config, "adapter_model.safetensors": weights})
    cli.hub.seed("me/pickled", {"README.md": card, "adapter_config.json": config, "adapter_model.bin": b"\x80\x04K\x01."})
    cli.hub.seed("me/bad-card", {"README.md": b"---\nbase_model: [unclosed\n---\n", "adapter_config.json": config})
    before = state(cli)
    assert_one_line_error(cli(*args, **env), message)
    assert_untouched(cli, before)
    assert cli.json("models", "show", "tiny")["hub_id"] == BASE_ID


@pytest.mark.parametrize("command", ["push", "pull"])
def test_a_network_failure_mid_way_is_one_line_and_changes_nothing(cli: Cli, lora_dir: Path, tmp_path: Path, command: str) -> None:
    cli.ok("push", trained_record(cli.home, lora_dir, tmp_path), "--repo", "me/reverse")
    ref = trained_record(cli.home, lora_dir, tmp_path, seed=2)  # rev:2, not on the Hub yet
    before = state(cli)
    if command == "push":
        cli.hub.fail("POST", r"/commit/", "drop")
        result = cli("push", ref, "--repo", "me/reverse")
    else:
        cli.hub.fail("GET", r"/resolve/.*/adapter_model.safetensors", "truncate", times=None)
        result = cli("pull", "me/reverse", "--name", "copy")
    assert_one_line_error(result, "failed mid-way")
    assert "run the command again" in result.stderr
    assert_untouched(cli, before)


def test_a_stalled_hub_is_a_time_out_not_a_hang(cli: Cli, lora_dir: Path, tmp_path: Path) -> None:
    ref = trained_record(cli.home, lora_dir, tmp_path)
    before = state(cli)
    cli.hub.fail("POST", r"/commit/", "stall")
    result = cli("push", ref, "--repo", "me/reverse", HF_HUB_DOWNLOAD_TIMEOUT="1")
    assert_one_line_error(result, "timed out mid-way (ReadTimeout")
    assert_untouched(cli, before)
