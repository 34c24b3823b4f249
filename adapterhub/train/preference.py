"""Preference tuning (issue 17): DPO, ORPO, KTO and reward models on TRL's own trainers.

Design decisions:
- No loss here is written by hand: the trainers are TRL 1.16's `DPOTrainer`, `KTOTrainer`,
  `RewardTrainer` and `trl.experimental.orpo.ORPOTrainer`, each given the base and the PEFT
  config apart (not a model wrapped beforehand). DPO and KTO with an adapter then take the base
  with the adapter switched off as the reference model, so no second copy is loaded; full and
  layerwise DPO precompute the reference log-probabilities once, before the first step, from
  the model as it is then (the base), instead of keeping a frozen copy in memory.
- Held-out pairs are scored before and after training with one definition for every base and
  method (`score_pairs`), on the batches TRL itself builds for evaluation (its tokenisation, chat
  template and truncation):
  * `preference_accuracy`: the share of held-out pairs whose chosen answer the model scores above
    the rejected one — by its summed log-probability of the answer tokens for dpo/orpo (before
    training, that is the base's own preference), by the reward head's score for reward models;
  * `reward_margin`: the mean implicit-reward margin beta·((log π(c) − log π_ref(c)) −
    (log π(r) − log π_ref(r))) for dpo (0 before training, by construction), the mean score
    margin of the reward head; `reward_accuracy` (dpo): the share of pairs with a positive margin.
  KTO's rows are unpaired, so it stores TRL's own evaluation figures only (rewards/chosen,
  rewards/rejected, their margin). TRL's batch means (`eval_rewards/*`) are stored as well.
- Tokens trained are counted alike for every task: the non-padding tokens of the sequences the
  policy is trained on (prompt + answer, chosen and rejected both for pairs; KTO's KL rows and
  the reference's forward passes are not training tokens). transformers counts them from the
  batch's `input_ids`/`attention_mask`, which DPO's, KTO's and the reward trainer's collators
  build; ORPO's (TRL's older paired collator) has none — its rows are `chosen_*`/`rejected_*` —
  so transformers counted nothing and such a run reported 0 tokens/s. `_ORPOTrainer` counts
  those two halves instead (the same sequences DPO's `input_ids` hold).
"""

from __future__ import annotations

from typing import Any

from adapterhub.train.config import Method, Task, TrainConfig

# TRL's evaluation keys kept in a run's metrics (before and after), named without the "eval_" prefix.
_TRL_EVAL_KEYS = (
    "eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/accuracies", "eval_rewards/margins",
    "eval_accuracy", "eval_margin",
)


def preference_arguments(config: TrainConfig, common: dict[str, Any]) -> Any:
    """TRL's config class for the task, built from the run's common `TrainingArguments` keywords."""
    kwargs = dict(common, max_length=config.max_length)
    if config.task == Task.DPO:
        from trl import DPOConfig

        return DPOConfig(
            **kwargs,
            beta=config.resolved_beta,
            loss_type=[config.loss_type or "sigmoid"],
            # Full/layerwise: the reference's log-probs once from the untrained model, not a second copy in memory.
            precompute_ref_log_probs=config.method in (Method.FULL, Method.LAYERWISE),
            dataset_num_proc=None,
        )
    if config.task == Task.ORPO:
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig(**kwargs, beta=config.resolved_beta, dataset_num_proc=None)
    if config.task == Task.KTO:
        from trl import KTOConfig

        return KTOConfig(**kwargs, beta=config.resolved_beta, loss_type=config.loss_type or "kto", dataset_num_proc=None)
    from trl import RewardConfig

    return RewardConfig(**kwargs, dataset_num_proc=None)


def build_preference_trainer(
    config: TrainConfig,
    model: Any,
    peft_config: Any | None,
    tokenizer: Any,
    train_dataset: Any,
    eval_dataset: Any | None,
    args: Any,
    callbacks: list[Any],
) -> Any:
    """The TRL trainer for the task; `peft_config` is applied by the trainer (see the module docstring)."""
    common: dict[str, Any] = dict(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=peft_config,
    )
    if config.task == Task.DPO:
        from trl import DPOTrainer

        return DPOTrainer(ref_model=None, **common)
    if config.task == Task.ORPO:
        return _orpo_trainer_class()(**common)
    if config.task == Task.KTO:
        from trl import KTOTrainer

        return KTOTrainer(ref_model=None, **common)
    from trl import RewardTrainer

    return RewardTrainer(**common)


def _orpo_trainer_class() -> type:
    """TRL's ORPOTrainer, counting the tokens of its paired batches (see the module docstring)."""
    from trl.experimental.orpo import ORPOTrainer

    class _ORPOTrainer(ORPOTrainer):
        def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
            halves = ("chosen", "rejected")
            if "input_ids" in inputs or not all(f"{half}_input_ids" in inputs for half in halves):
                return super()._track_num_input_tokens(inputs)
            mode = self.args.include_num_input_tokens_seen
            if mode == "no":
                return None
            import torch

            if mode == "non_padding":
                counted = sum(inputs[f"{half}_attention_mask"].sum() for half in halves)
            else:
                counted = sum(inputs[f"{half}_input_ids"].numel() for half in halves)
            counted = torch.as_tensor(counted, device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += self.accelerator.gather(counted).sum().item()
            return None

    return _ORPOTrainer


def _answer_log_probs(model: Any, batch: dict[str, Any]) -> Any:
    """Summed log-probability of each sequence's completion tokens (`completion_mask`), one per row."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits = logits[:, -batch["input_ids"].shape[1]:]  # prompt-learning adapters prepend virtual positions
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = batch["input_ids"][:, 1:]
    per_token = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (per_token * batch["completion_mask"][:, 1:]).sum(dim=1)


def _dpo_pair_scores(trainer: Any) -> list[tuple[float, float, float, float]]:
    """(policy chosen, policy rejected, reference chosen, reference rejected) log-probs per held-out pair."""
    import torch
    from peft import PeftModel

    model = trainer.accelerator.unwrap_model(trainer.model)
    was_training = model.training
    model.eval()
    scores: list[tuple[float, float, float, float]] = []
    try:
        with torch.no_grad():
            for batch in trainer.get_eval_dataloader():
                batch = trainer._prepare_inputs(batch)
                policy_chosen, policy_rejected = _answer_log_probs(model, batch).chunk(2)
                if "ref_chosen_logps" in batch:
                    ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
                elif isinstance(model, PeftModel):
                    with model.disable_adapter():
                        ref_chosen, ref_rejected = _answer_log_probs(model, batch).chunk(2)
                else:
                    ref_chosen, ref_rejected = _answer_log_probs(trainer.ref_model, batch).chunk(2)
                rows = zip(policy_chosen.tolist(), policy_rejected.tolist(), ref_chosen.tolist(), ref_rejected.tolist())
                scores.extend(rows)
    finally:
        model.train(was_training)
    return scores


def _reward_pair_scores(trainer: Any) -> list[tuple[float, float]]:
    """(chosen score, rejected score) of the reward head per held-out pair."""
    import torch

    model = trainer.accelerator.unwrap_model(trainer.model)
    was_training = model.training
    model.eval()
    scores: list[tuple[float, float]] = []
    try:
        with torch.no_grad():
            for batch in trainer.get_eval_dataloader():
                batch = trainer._prepare_inputs(batch)
                rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
                chosen, rejected = rewards.float().chunk(2)
                scores.extend(zip(chosen.tolist(), rejected.tolist()))
    finally:
        model.train(was_training)
    return scores


def score_pairs(config: TrainConfig, trainer: Any) -> dict[str, Any]:
    """Held-out preference figures of the model as it is now (see the module docstring)."""
    figures: dict[str, Any] = {}
    if config.task == Task.DPO:
        scores = _dpo_pair_scores(trainer)
        if scores:
            beta = config.resolved_beta
            margins = [beta * ((pc - rc) - (pr - rr)) for pc, pr, rc, rr in scores]
            figures["preference_accuracy"] = sum(pc > pr for pc, pr, _, _ in scores) / len(scores)
            figures["reward_accuracy"] = sum(m > 0 for m in margins) / len(margins)
            figures["reward_margin"] = sum(margins) / len(margins)
            figures["held_out_pairs"] = len(scores)
    elif config.task == Task.REWARD:
        scores = _reward_pair_scores(trainer)
        if scores:
            figures["preference_accuracy"] = sum(c > r for c, r in scores) / len(scores)
            figures["reward_margin"] = sum(c - r for c, r in scores) / len(scores)
            figures["held_out_pairs"] = len(scores)
    metrics = trainer.evaluate()
    for key in _TRL_EVAL_KEYS:
        if key in metrics:
            figures[key] = metrics[key]
    if config.task == Task.ORPO and "eval_rewards/accuracies" in metrics:
        # ORPO's rewards are beta times the policy's mean answer log-probability (it has no reference).
        figures["preference_accuracy"] = metrics["eval_rewards/accuracies"]
        figures["reward_margin"] = metrics.get("eval_rewards/margins")
    if config.task == Task.KTO and "eval_rewards/margins" in metrics:
        figures["reward_margin"] = metrics["eval_rewards/margins"]
    return figures
