"""`adapterhub push` and `adapterhub pull`: registry records to and from the Hugging Face Hub.

    adapterhub push REF --repo OWNER/NAME [--private] [--revision BRANCH] [--create-pr] [--message M] [--json]
    adapterhub pull OWNER/NAME[@REVISION] [--name NAME] [--base BASE] [--tag TAG] [--json]

Design decisions:
- This module wires the registry to `adapterhub.hub` and owns no Hub logic: it reads a record
  into `CardInputs` (the parents' Hub repos from their push and pull records on this endpoint),
  exports the record's files, puts the card beside them as README.md (replacing PEFT's generic
  one), and hands the directory to `push_folder`; a pull hands `pulled_repo`'s download to
  `Registry.put_adapter`, the same validation as `import`, and records where it came from.
- Everything that can be refused before the Hub is asked is: the ref, the repo id, a base model
  without a Hub id (named with the `--hub-id` that fixes it), a `--base` that is not registered,
  a name that is not a registry name. The registry is written only after the Hub part succeeded:
  the push record after the commit, the pulled record after the whole download validated.
- Temporary files (the exported record and card; the download) live in one directory removed
  whatever happens, so a failure mid-way leaves nothing behind.
- Progress: a push shows a rich bar of the bytes sent once it has run for half a second (a push
  of unchanged files shows none); with Xet the client's own progress is shown instead.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from adapterhub.cli.common import JsonOption, console, err_console, human_bytes, open_registry, print_json
from adapterhub.errors import AdapterhubError, ValidationError
from adapterhub.hub.ids import parse_repo_spec, validate_hub_id
from adapterhub.names import name_problems
from adapterhub.registry import AdapterRecord, BaseModelRecord, Lineage, Registry

if TYPE_CHECKING:
    from adapterhub.hub.card import CardInputs

# Showing a bar for an upload that is over in a blink is noise; after this long, it is not.
PROGRESS_DELAY_S = 0.5


class _UploadProgress:
    """A rich bar of bytes sent, on stderr, shown only once the upload has run for `PROGRESS_DELAY_S`."""

    def __init__(self, description: str, total: int) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
            console=err_console, transient=True,
        )
        self._task = self._progress.add_task(description, total=max(total, 1))
        self._lock = threading.Lock()
        self._shown = self._done = False
        self._timer = threading.Timer(PROGRESS_DELAY_S, self._show)
        self._timer.daemon = True

    def _show(self) -> None:
        with self._lock:
            if not self._done:
                self._progress.start()
                self._shown = True

    def __call__(self, sent: int, total: int) -> None:
        self._progress.update(self._task, completed=sent, total=max(total, 1))

    def __enter__(self) -> _UploadProgress:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            self._done = True
            if self._shown:
                self._progress.stop()


# ------------------------------------------------------------------ push


def _card_inputs(registry: Registry, record: AdapterRecord, base: BaseModelRecord, repo_id: str, endpoint: str) -> CardInputs:
    """What the card says about `record`: the record, its base, and each parent's Hub repo on `endpoint`."""
    from adapterhub.hub.card import CardInputs, EvaluationRow, ParentInfo

    lineage = record.lineage
    parents = []
    for parent_ref in lineage.parents if lineage else ():
        parent = registry.resolve(parent_ref)
        parents.append(ParentInfo(ref=parent_ref, hub_id=parent.hub_repo(endpoint) if parent is not None else None))
    assert base.hub_id is not None
    return CardInputs(
        repo_id=repo_id, ref=record.ref, sha256=record.sha256, kind=record.kind, peft_type=record.peft_type,
        task_type=record.task_type, config=dict(record.config), base_name=base.name, base_hub_id=base.hub_id,
        base_fingerprint=base.fingerprint, files=tuple(sorted(record.files)),
        lineage_kind=lineage.kind if lineage else None, lineage_details=dict(lineage.details) if lineage else {},
        parents=tuple(parents),
        evaluations=tuple(EvaluationRow(metric=e.metric, value=e.value, dataset=e.dataset, split=e.split) for e in record.evaluations),
        tags=record.tags,
    )


def push(
    ref: Annotated[str, typer.Argument(help="The record to publish: name, name:version or name@sha-prefix.")],
    repo: Annotated[str, typer.Option("--repo", help="Hub repo OWNER/NAME; created when it does not exist.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private (an existing repo keeps its visibility).")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch to commit to (created from main when missing); with --create-pr, the branch the PR targets.")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request with the commit instead of committing to the branch.")] = False,
    message: Annotated[Optional[str], typer.Option("--message", help="Commit message (default: 'Push REF with adapterhub').")] = None,
    json_output: JsonOption = False,
) -> None:
    """Publish a record to the Hugging Face Hub in PEFT layout, with a model card of its lineage and evaluations.

    The endpoint and token are the Hugging Face client's (HF_ENDPOINT, HF_TOKEN, `hf auth login`).
    Pushing identical content again makes no commit.
    """
    validate_hub_id(repo, what="Hub repo")
    if revision is not None and not revision.strip():
        raise AdapterhubError("--revision is empty; give a branch name")
    registry = open_registry()
    record = registry.get(ref)
    base = registry.get_base_model(record.base_name)
    if base.hub_id is None:
        raise AdapterhubError(
            f"cannot push {record.ref}: its base model {base.name!r} has no Hub id, and a card's base_model must be one; "
            f"give it one with `adapterhub models add {base.name} --hub-id ORG/NAME`"
        )
    from adapterhub.hub.card import CARD_FILE, build_card, point_config_at_hub_base
    from adapterhub.hub.client import hub_endpoint, push_folder, uploads_through_xet

    endpoint = hub_endpoint()
    scratch = Path(tempfile.mkdtemp(prefix="adapterhub-push-"))
    try:
        folder = registry.export(record.ref, scratch / "files")  # blobs verified on the way out
        (folder / CARD_FILE).unlink(missing_ok=True)  # PEFT's generic card: ours replaces it
        point_config_at_hub_base(folder, base.hub_id)  # not the author's local path to the base
        build_card(_card_inputs(registry, record, base, repo, endpoint)).save(folder / CARD_FILE)
        total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        commit_message = message or f"Push {record.ref} with adapterhub"
        if uploads_through_xet():
            with err_console.status(f"pushing {record.ref} to {repo} ({human_bytes(total)}, through Xet) …"):
                result = push_folder(folder, repo_id=repo, message=commit_message, private=private, revision=revision, create_pr=create_pr)
        else:
            with _UploadProgress(f"pushing {record.ref} to {repo}", total) as progress:
                result = push_folder(folder, repo_id=repo, message=commit_message, private=private, revision=revision,
                                     create_pr=create_pr, progress=progress)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    registry.record_hub_transfer(
        record.ref, direction="push", endpoint=result.endpoint, repo_id=result.repo_id, revision=result.revision,
        commit_sha=result.commit_sha, pr_url=result.pr_url,
    )
    if json_output:
        print_json({
            "ref": record.ref, "repo": result.repo_id, "revision": result.revision, "commit": result.commit_sha,
            "commit_url": result.commit_url, "pr_url": result.pr_url, "created": result.created,
            "deleted": list(result.deleted), "endpoint": result.endpoint,
        })
        return
    where = f"{result.repo_id}@{result.revision}"
    if not result.created:
        console.print(f"{where} already holds identical content (commit {result.commit_sha[:12]}); no commit made", markup=False)
    elif result.pr_url:
        console.print(f"opened a pull request on {result.repo_id} with {record.ref}: {result.pr_url} "
                      f"({result.revision}, commit {result.commit_sha[:12]})", markup=False)
    else:
        console.print(f"pushed {record.ref} to {where}: commit {result.commit_sha[:12]} ({result.commit_url})", markup=False)
    if result.deleted:
        console.print(f"removed from the branch, as {record.ref} does not have them: {', '.join(result.deleted)}", markup=False)


# ------------------------------------------------------------------ pull


def _pull_base(registry: Registry, card: Any, repo_id: str, base: str | None) -> BaseModelRecord:
    """The registered base the pulled files belong to: `--base`, else the one whose Hub id the card names."""
    if base is not None:
        return registry.get_base_model(base)
    if card is None or not card.base_models:
        raise AdapterhubError(f"{repo_id} has no model card naming its base_model; pass --base with the registered base model")
    for hub_id in card.base_models:
        matches = registry.base_models_with_hub_id(hub_id)
        if len(matches) > 1:
            names = ", ".join(m.name for m in matches)
            raise AdapterhubError(f"{repo_id} is for {hub_id}, which several registered base models are ({names}); pass --base with one")
        if matches:
            return matches[0]
    named = " or ".join(card.base_models)
    raise AdapterhubError(
        f"{repo_id} is for {named}, and no registered base model has that Hub id; register it with "
        f"`adapterhub models add NAME PATH --hub-id {card.base_models[0]}`, or pass --base"
    )


def pull(
    spec: Annotated[str, typer.Argument(metavar="OWNER/NAME[@REVISION]", help="The Hub repo, and optionally a branch, tag or commit.")],
    name: Annotated[Optional[str], typer.Option("--name", "-n", help="Registry name (default: the repo's NAME).")] = None,
    base: Annotated[Optional[str], typer.Option("--base", "-b", help="Registered base model (default: the one whose Hub id the card's base_model names).")] = None,
    tag: Annotated[Optional[list[str]], typer.Option("--tag", "-t", help="Tag to attach (repeatable).")] = None,
    json_output: JsonOption = False,
) -> None:
    """Download a Hub repo and import it into the registry, validated like `import`.

    The same content pulled again is the same record. The download is removed afterwards.
    """
    repo_id, revision = parse_repo_spec(spec)
    record_name = name or repo_id.split("/", 1)[1]
    problems = name_problems(record_name)
    if problems:
        hint = "" if name else "; choose one with --name"
        raise AdapterhubError(f"cannot pull {repo_id} as {record_name!r}: {problems[0]}{hint}")
    registry = open_registry()
    if base is not None:
        registry.get_base_model(base)  # an unknown --base is refused before anything is downloaded
    from adapterhub.hub.client import pulled_repo

    with err_console.status(f"downloading {spec} …"), pulled_repo(repo_id, revision) as pulled:
        base_record = _pull_base(registry, pulled.card, repo_id, base)
        lineage = Lineage(kind="imported", details={
            "source": f"{pulled.endpoint}/{repo_id}", "repo": repo_id, "revision": pulled.revision,
            "commit": pulled.commit_sha, "endpoint": pulled.endpoint,
        })
        try:
            result = registry.put_adapter(name=record_name, source_dir=pulled.path, base=base_record.name, tags=tuple(tag or ()), lineage=lineage)
        except ValidationError as exc:
            # The subject would name the temporary download; the repo is what the user knows.
            raise ValidationError(f"{repo_id}@{pulled.commit_sha[:12]}", exc.problems) from None
    registry.record_hub_transfer(
        result.record.ref, direction="pull", endpoint=pulled.endpoint, repo_id=repo_id, revision=pulled.revision,
        commit_sha=pulled.commit_sha,
    )
    record = result.record
    if result.skipped:
        err_console.print(f"skipped {len(result.skipped)} pickled file(s), which the registry never stores: {', '.join(result.skipped)}", markup=False)
    if json_output:
        print_json({"ref": record.ref, "created": result.created, "repo": repo_id, "revision": pulled.revision,
                    "commit": pulled.commit_sha, "base": base_record.name, "skipped": list(result.skipped)})
        return
    where = f"{repo_id}@{pulled.revision} (commit {pulled.commit_sha[:12]})"
    if result.created:
        kind = f"{record.kind} r={record.rank}" if record.rank else record.kind
        console.print(f"pulled {where} as {record.ref} ({kind} on {base_record.name}, {human_bytes(record.size_bytes)})", markup=False)
    else:
        console.print(f"identical content is already registered as {record.ref}; nothing imported (pulled {where})", markup=False)


def register(app: typer.Typer) -> None:
    app.command("push")(push)
    app.command("pull")(pull)

