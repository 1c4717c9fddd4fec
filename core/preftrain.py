"""Preference training in the trainer process: DPO and ORPO on tunedeck's rendered pairs.

Both run on trl's ``DPOTrainer`` (its loop, metrics, fused LM head and peft handling), fed
the pairs :func:`tunedeck.core.preference.render_pairs` rendered, so the tokens that count
are the ones the Dataset screen shows trained: each answer and its end-of-turn token,
never the prompt. trl neither re-tokenizes nor re-truncates them
(:meth:`PreferenceTrainer._prepare_dataset` keeps the examples as they are);
:class:`PairCollator` pads each batch's chosen rows, then its rejected rows.

- **DPO**: trl's loss (``preference.loss_type``, ``beta``, ``label_smoothing``; with
  ``sft_weight`` trl's "sft" loss on the chosen answers is added, as in RPO). The
  reference is the model with its adapter off (a new adapter), so no second copy of the
  weights is loaded; a run that continues a finished run's adapter (``model.adapter``)
  keeps a frozen copy of that adapter as its reference (trl's "ref" adapter), so DPO after
  SFT measures against the SFT model.
- **ORPO**: no reference. The loss is the chosen answers' negative log-likelihood per token
  minus ``beta`` times the log-sigmoid of the log odds ratio of the chosen over the rejected
  answer (the ORPO paper's, as trl's ``ORPOTrainer`` computes it), with the same metrics.
  trl's ORPO trainer is experimental and tokenizes the data itself, training the NLL over
  the prompt as well; here the NLL covers the answers' trained tokens only.

The metrics reach the events under flat names (:data:`METRICS`): ``rewards_chosen``,
``rewards_rejected``, ``reward_margin``, ``reward_accuracy``, ``logps_chosen``,
``logps_rejected`` (and ORPO's ``nll_loss``, ``log_odds_ratio``).
"""

from __future__ import annotations

import functools
from typing import Any

from .render import IGNORE

# trl's metric names -> the events' names
METRICS = {
    "rewards/chosen": "rewards_chosen", "rewards/rejected": "rewards_rejected", "rewards/margins": "reward_margin",
    "rewards/accuracies": "reward_accuracy", "logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected",
    "nll_loss": "nll_loss", "log_odds_ratio": "log_odds_ratio",
}
COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


def event_metrics(logs: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A log dict's preference metrics under the events' names (``prefix`` "eval_" for evals)."""
    out = {}
    for name, flat in METRICS.items():
        if prefix + name in logs:
            out[prefix + flat] = logs[prefix + name]
    return out


class PairCollator:
    """Pads a batch of rendered pairs: its chosen rows first, then its rejected rows, on the
    right; ``completion_mask`` marks the tokens whose label trains (tunedeck's mask)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids = [e["chosen_input_ids"] for e in examples] + [e["rejected_input_ids"] for e in examples]
        labels = [e["chosen_labels"] for e in examples] + [e["rejected_labels"] for e in examples]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        completion = torch.zeros((len(ids), width), dtype=torch.long)
        for i, (row, lab) in enumerate(zip(ids, labels)):
            n = len(row)
            input_ids[i, :n] = torch.tensor(row, dtype=torch.long)
            attention[i, :n] = 1
            completion[i, :n] = torch.tensor([label != IGNORE for label in lab], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def loss_types(project: Any) -> tuple[list[str], list[float]]:
    """trl's ``loss_type`` and ``loss_weights`` for a DPO project."""
    types, weights = [project["preference.loss_type"]], [1.0]
    if project["preference.sft_weight"] > 0:
        types.append("sft")
        weights.append(float(project["preference.sft_weight"]))
    return types, weights


def ignored_settings(project: Any) -> list[str]:
    """The [preference] keys set away from their defaults that the project's method does not read."""
    from .schema import SECTION_FIELDS

    method = project["training.method"]
    read = {"dpo": ("beta", "loss_type", "label_smoothing", "sft_weight"), "orpo": ("beta",)}.get(method, ())
    return [f"preference.{k}" for k, f in SECTION_FIELDS["preference"].items()
            if k not in read and project[f"preference.{k}"] != f.default]


@functools.cache
def preference_trainer_class() -> Any:
    """trl's DPOTrainer taking tunedeck's rendered pairs, with ORPO's loss when ``method`` is "orpo"."""
    import torch
    import torch.nn.functional as F
    from trl import DPOTrainer

    class PreferenceTrainer(DPOTrainer):
        method = "dpo"

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            return dataset  # rendered, masked and truncated by tunedeck.core.preference

        def _set_signature_columns_if_needed(self) -> None:
            if self._signature_columns is None:
                self._signature_columns = list(COLUMNS)

        def _compute_loss(self, model: Any, inputs: Any, return_outputs: bool) -> Any:
            if self.method != "orpo":
                return super()._compute_loss(model, inputs, return_outputs)
            return self._orpo_loss(model, inputs, return_outputs)

        def _orpo_loss(self, model: Any, inputs: Any, return_outputs: bool) -> Any:
            mode = "train" if self.model.training else "eval"
            completion_mask = inputs["completion_mask"]
            model_kwargs = {k: v for k, v in inputs.items() if k != "completion_mask"}
            model_kwargs["use_cache"] = False
            labels = inputs["input_ids"].masked_fill(completion_mask == 0, IGNORE)
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
            mask = completion_mask[..., 1:]
            per_token = outputs.log_probs[:, -mask.size(1):]
            tokens = mask.sum(dim=1).clamp(min=1)
            mean_logps = (per_token * mask).sum(dim=1) / tokens  # per token, as ORPO's odds are
            chosen, rejected = mean_logps.chunk(2, dim=0)
            chosen_mask, _ = mask.chunk(2, dim=0)
            chosen_tokens, _ = per_token.chunk(2, dim=0)
            nll = -(chosen_tokens * chosen_mask).sum() / chosen_mask.sum().clamp(min=1)
            # log odds(y) = log p - log(1 - p), with p the mean per-token probability
            log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen).clamp(max=1 - 1e-7))
                                              - torch.log1p(-torch.exp(rejected).clamp(max=1 - 1e-7)))
            ratio = F.logsigmoid(log_odds)
            loss = nll - self.beta * ratio.mean()
            gather = self.accelerator.gather_for_metrics
            chosen_rewards, rejected_rewards = self.beta * chosen.detach(), self.beta * rejected.detach()
            metrics = self._metrics[mode]
            metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
            metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
            metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
            metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
            metrics["logps/chosen"].append(gather(chosen.detach()).mean().item())
            metrics["logps/rejected"].append(gather(rejected.detach()).mean().item())
            metrics["nll_loss"].append(gather(nll.detach()).mean().item())
            metrics["log_odds_ratio"].append(gather(ratio.detach().mean()).mean().item())
            if mode == "train":
                self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item()
            return (loss, outputs) if return_outputs else loss

    return PreferenceTrainer


def drop_fresh_reference(model: Any) -> None:
    """trl adds a frozen "ref" copy of the adapter to any peft model it is given; for a new
    adapter (zero at the start) that is the base model, which disabling the adapter gives
    for free, so the copy is removed."""
    from peft import PeftModel

    if isinstance(model, PeftModel) and "ref" in model.peft_config:
        model.delete_adapter("ref")
