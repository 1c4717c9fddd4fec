"""One fine-tuning run inside the trainer process: LoRA / QLoRA with trl's SFTTrainer, or,
for ``training.method = "dpo" | "orpo"``, on preference pairs with trl's DPOTrainer
(:mod:`tunedeck.core.preftrain`).

:class:`Run` goes from the run's snapshot to its adapter, in order (anything the user can
fix stops it with one line, a :class:`~tunedeck.core.errors.UserError`, before training
starts):

1. loads ``runs/<name>/project.toml`` (the snapshot the launcher wrote) and resolves the
   "auto" settings for this machine;
2. loads the tokenizer, picks the chat template, and renders every row through
   :func:`tunedeck.core.render.render_rows` (the same code as the dataset preview);
   refuses a dataset with no trainable token left. Rows rendered before (by the dataset
   preview's stats or an earlier run on the same data, tokenizer and settings) are read
   from :mod:`tunedeck.core.rendercache` instead, and the rows rendered now are added to
   it; the run's data info (``render_cache`` in run_started) says which;
3. loads the model: full precision for LoRA (fp32 on a CPU, bf16/fp16 on a GPU), or
   4-bit / 8-bit through bitsandbytes for QLoRA, then ``prepare_model_for_kbit_training``;
   weights come from safetensors (or GGUF) only, unless ``model.allow_pickle``;
4. wraps it with peft (``LoraConfig`` from ``[lora]``; with ``model.adapter``, the finished
   run's adapter is loaded trainable instead, its settings in the snapshot's ``[lora]``), refusing target modules that
   match nothing (and listing the ones that exist) or zero trainable parameters; the
   trainable (adapter) weights are kept in fp32 while the frozen base stays in the
   training precision;
5. trains with ``SFTTrainer`` on the pre-tokenized examples with ``skip_prepare_dataset``
   (trl neither re-masks, re-truncates nor re-pads them), batched by
   :mod:`tunedeck.core.batching`: padding-free where the model's attention takes packed
   rows (else padded per batch, rows grouped by length), packed first with
   ``dataset.packing``, tunedeck's labels kept in every layout. Off a Triton GPU the loss
   projects only the positions that train through the LM head (the compact head);
6. writes checkpoints to ``checkpoints/`` (resume continues from the latest, at its step)
   and the final adapter to ``adapter/`` in the standard PEFT layout with the tokenizer
   and its chat template, so ``PeftModel.from_pretrained(base, "runs/<name>/adapter")``
   loads it with no tunedeck code.

:class:`EventsCallback` turns the trainer's progress into events and applies the controls
between optimizer steps (stop = save a checkpoint, write the adapter and end; save =
checkpoint now and go on). Under several processes rank 0 takes the controls and sends
them to every rank at each step, so all ranks stop and save together. Losses that turn
NaN/inf are reported as warnings; three logged in a row end the run as failed ("diverged").

The trainer process itself (signals, the channel, the run's record) is
:mod:`tunedeck.core.trainer`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from transformers import PrinterCallback, TrainerCallback

from .errors import UserError, first_line
from .events import CHECKPOINT, EVAL, FAILED, FINISHED, RUN_STARTED, STEP, SYSTEM, library_versions, system_fields
from .runs import ADAPTER, CHECKPOINTS, ENV_FILE, SNAPSHOT, latest_checkpoint

SYSTEM_EVERY_S = 5.0  # seconds between system events
NAN_LIMIT = 3  # logged non-finite losses in a row that end a run
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class Run:
    """One training run, from the snapshot to the adapter."""

    def __init__(self, spec: Any, emit: Any, controls: Any) -> None:
        """``spec``: the :class:`~tunedeck.core.rundir.RunSpec`; ``emit`` and ``controls``:
        the trainer process's :class:`~tunedeck.core.trainer.Emitter` and
        :class:`~tunedeck.core.trainer.Controls`."""
        from .project import Project

        self.spec = spec
        self.emit = emit
        self.controls = controls
        self.run_dir = Path(spec.run_dir)
        self.project = Project.load(self.run_dir / SNAPSHOT)
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.env: dict[str, Any] = {}  # env.json, once written
        self.params = (0, 0)  # trainable, total; once the adapter is on
        self.resolved: Any = None  # "auto" settings made concrete (tunedeck.core.resolve.Resolved)
        self.ref: Any = None  # where the model's files are (tunedeck.core.models.ModelRef)
        self.callback: EventsCallback | None = None
        self.memory_estimate: dict[str, Any] | None = None  # recorded in run_started (rank 0)

    def execute(self) -> dict[str, Any]:
        trainer, has_eval = self.build()
        checkpoint = latest_checkpoint(self.run_dir) if self.spec.resume else None
        if self.spec.resume and checkpoint is None:
            raise UserError(f"--resume: {self.run_dir} has no checkpoint to resume from")
        self.callback.resumed_from = checkpoint
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        return self._finish(trainer, has_eval)

    def build(self) -> tuple[Any, bool]:
        """Everything up to a ready SFTTrainer (the refusals happen here); returns it and
        whether there is an eval set."""
        from .models import load_tokenizer, resolve_source
        from .resolve import resolve

        project = self.project
        self.resolved = resolve(project)
        if self.resolved.device == "cpu" and project["training.precision"] == "auto":
            from .hardware import detect
            from .precision import cached_probe, ensure_probe

            # once per machine: whether bf16 is fast and trains the same on this CPU
            if cached_probe() is None and ensure_probe() is not None:
                detect.cache_clear()  # the answer is one of the machine's facts: read them again
                self.resolved = resolve(project)
        self.ref = resolve_source(project["model.source"], project.root, allow_pickle=project["model.allow_pickle"])
        if self.rank == 0:
            self._write_env()
        tokenizer = load_tokenizer(self.ref, trust_remote_code=project["model.trust_remote_code"])
        train_ds, eval_ds, data_info = self._datasets(tokenizer)
        if self.rank == 0:
            self.memory_estimate = self._estimate(data_info)
        from transformers import set_seed

        set_seed(project["training.seed"])  # the adapter's starting weights follow training.seed too
        model = self._adapt(self._model())
        return self._trainer(model, tokenizer, train_ds, eval_ds, data_info), eval_ds is not None

    # -- data -------------------------------------------------------------------------------

    def _datasets(self, tokenizer: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, dict[str, Any]]:
        from .datafile import load_splits
        from .render import missing_template_tokens, render_splits
        from .rendercache import RowCache, cache_path

        p = self.project
        splits = load_splits(p)
        summary = splits.summary
        if summary.skipped:
            first = summary.skipped[0]
            self.emit.warn(f"{len(summary.skipped)} of {summary.rows} rows skipped (row {first.row}: {first.reason})")
        if summary.trimmed:
            self.emit.warn(f"{len(summary.trimmed)} row(s) end with a question after their last answer; it is dropped "
                           f"and the rest trains (first: row {summary.trimmed[0]})")

        template_name = p["model.chat_template"]
        # rows rendered before (by the Dataset screen's stats or an earlier run) are read, not tokenized
        cache = RowCache(cache_path(p), repeats=True, write=getattr(self, "rank", 0) == 0)
        try:
            rendered = render_splits(p, tokenizer, splits, model_label=f"model {self.ref.display}", cache=cache)
        finally:
            cache.finish()
        if rendered.template is not None:
            tokenizer.chat_template = rendered.template  # saved with the adapter: chat uses what trained
            missing = missing_template_tokens(tokenizer, template_name)
            if missing:
                self.emit.warn(f"chat template {template_name} uses {', '.join(missing)}, which this tokenizer "
                               "does not have as tokens; they are trained as plain text pieces")
        max_length = p["dataset.max_length"]
        stats, eval_stats = rendered.train_stats, rendered.eval_stats
        train_examples = rendered.train
        self._report_render(stats, "training", max_length)
        eval_ds = None
        if eval_stats is not None:
            self._report_render(eval_stats, "eval", max_length)
            eval_ds = rendered.eval
        info = {"format": summary.format, "sources": [s.as_dict() for s in splits.sources], "train": stats.as_dict(),
                "eval": eval_stats.as_dict() if eval_stats else None, "chat_template": template_name,
                "render_cache": cache.report(), "method": p["training.method"]}
        if rendered.pairs is not None:
            info["pairs"] = rendered.pairs.as_dict(stats.kept)
            self._report_pairs(info["pairs"])
        return train_examples, eval_ds, info

    def _report_pairs(self, pairs: dict[str, Any]) -> None:
        """Warnings a preference set deserves: settings its method does not read, a length bias."""
        from .preference import length_bias
        from .preftrain import ignored_settings

        p = self.project
        ignored = ignored_settings(p)
        if ignored:
            self.emit.warn(f"{', '.join(ignored)} do(es) not apply to training.method = \"{p['training.method']}\" "
                           "and is ignored")
        if p["dataset.loss_on"] == "all":
            self.emit.warn('dataset.loss_on = "all" is ignored: a preference method compares the answers, never the '
                           "prompt")
        side = length_bias(pairs)
        if side:
            share = pairs["chosen_longer_percent"] if side == "longer" else 100 - pairs["chosen_longer_percent"]
            self.emit.warn(f"the chosen answer is {side} than the rejected one in {share:.0f}% of the pairs: the model "
                           f"may learn that {side} is better (length bias); balance the pairs, or use "
                           'preference.loss_type = "sigmoid_norm" (per-token)')

    def _report_render(self, stats: Any, which: str, max_length: int) -> None:
        if stats.fully_masked:
            self.emit.warn(f"{len(stats.fully_masked)} {which} row(s) left out: nothing to train after truncation "
                           f"to {max_length} tokens (first: row {stats.fully_masked[0]})")
        if stats.failed:
            number, reason = stats.failed[0]
            self.emit.warn(f"{len(stats.failed)} {which} row(s) left out: the chat template cannot render them "
                           f"(row {number}: {reason})")
        if stats.truncated:
            self.emit.warn(f"{stats.truncated} of {stats.rows} {which} rows are longer than dataset.max_length = "
                           f"{max_length} and were truncated (longest: {stats.longest} tokens)")
        if stats.no_stop:
            self.emit.warn(f"the chat template puts no end-of-turn token after answers in {stats.no_stop} {which} "
                           "row(s); the model may not learn to stop")

    def _estimate(self, data_info: dict[str, Any]) -> dict[str, Any] | None:
        """The run's peak-memory estimate, the one every screen and command shows
        (:func:`tunedeck.core.inspect.project_memory`), at the longest row of the rows just
        rendered; that row is kept for the screens too. None when the model cannot be
        inspected (the run trains all the same)."""
        from .inspect import inspect_project, project_choice, project_memory
        from .memory import remember_longest_row

        p = self.project
        longest = int(data_info["train"]["longest"])
        if data_info["eval"] and not isinstance(p["dataset.eval_split"], str):  # held out of the same file
            longest = max(longest, int(data_info["eval"]["longest"]))
        remember_longest_row(p, longest)
        try:
            ins = inspect_project(p)
            return project_memory(p, ins, project_choice(p, ins), longest_row=longest).as_dict()
        except Exception:  # noqa: BLE001 - an estimate is not worth failing a run for
            return None

    # -- model ------------------------------------------------------------------------------

    def _model(self) -> Any:
        import torch
        from transformers import BitsAndBytesConfig

        from .models import load_model

        p, r = self.project, self.resolved
        mode = p["quantization.mode"]
        kwargs: dict[str, Any] = {}
        if mode == "none":
            kwargs["dtype"] = getattr(torch, TORCH_DTYPES[r.precision])
        else:
            compute = getattr(torch, r.compute_dtype)
            if mode == "4bit":
                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type=p["quantization.quant_type"],
                    bnb_4bit_use_double_quant=p["quantization.double_quant"], bnb_4bit_compute_dtype=compute,
                )
            else:
                kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
            kwargs["dtype"] = compute
        if mode != "none" or (r.device == "cuda" and not sharded()):
            # straight to this process's device (under DDP each rank loads its own copy to its own GPU, never
            # the whole model into CPU RAM per rank); quantized weights must be placed at load time. Only a
            # sharded run (FSDP, ZeRO-3) loads on the CPU for accelerate to shard.
            kwargs["device_map"] = {"": self.local_rank if r.device == "cuda" else "cpu"}
        model = load_model(self.ref, trust_remote_code=p["model.trust_remote_code"],
                           allow_pickle=p["model.allow_pickle"], **kwargs)
        if r.device == "cuda" and r.precision != "fp32" and p["dataset.padding_free"] is not False:
            use_flash_attention(model)
        if mode != "none":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=r.gradient_checkpointing)
        model.config.use_cache = False
        return model

    def _adapt(self, model: Any) -> Any:
        from peft import get_peft_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        from .inspect import lora_config

        p = self.project
        target = p["lora.target_modules"]
        if p["model.adapter"]:
            return self._continue_adapter(model)
        config = lora_config(p.values["lora"])
        existing = ", ".join(linear_module_names(model))
        try:
            model = get_peft_model(model, config)
        except ValueError as exc:  # peft's NoMatchingPeftModuleError is a ValueError
            message = str(exc)
            if "not found in the base model" in message or "No modules were targeted" in message:
                raise UserError(f"lora.target_modules = {_toml(target)} matches no module of this model; "
                                f"its linear layers are: {existing}") from None
            if message.startswith("Target module"):
                raise UserError(f"lora.target_modules = {_toml(target)}: {message.splitlines()[0]} "
                                f"Pick linear layers: {existing}") from None
            raise
        if isinstance(model.get_output_embeddings(), BaseTunerLayer):
            raise UserError(f"lora.target_modules = {_toml(target)} includes the output layer (lm_head), which trl "
                            'cannot train through an adapter; train it in full with lora.modules_to_save = ["lm_head"]')
        trainable, total = model.get_nb_trainable_parameters()
        check_trainable(trainable, target)
        self.params = (trainable, total)
        return model

    def _continue_adapter(self, model: Any) -> Any:
        """``model.adapter``: the finished run's adapter, loaded trainable (the snapshot's
        [lora] holds its settings, written by the launcher)."""
        from peft import PeftModel

        from .chat import start_adapter

        start = start_adapter(self.project)
        try:
            model = PeftModel.from_pretrained(model, str(start.adapter), is_trainable=True)
        except (ValueError, RuntimeError, KeyError) as exc:  # shapes or names that do not fit this model
            raise UserError(f"model.adapter = {self.project['model.adapter']!r}: the adapter does not fit this "
                            f"model ({first_line(exc)}); pick a run of model.source") from None
        trainable, total = model.get_nb_trainable_parameters()
        check_trainable(trainable, self.project["lora.target_modules"])
        self.params = (trainable, total)
        return model

    # -- trainer ----------------------------------------------------------------------------

    def _batching(self, model: Any, train: list[dict[str, Any]], eval_rows: list[dict[str, Any]] | None,
                  data_info: dict[str, Any]) -> tuple[Any, Any, bool]:
        """The examples as Datasets in the run's batch layout (:mod:`tunedeck.core.batching`),
        and whether batches are padding-free; the layout is recorded in ``data_info``."""
        from datasets import Dataset

        from .batching import model_padding_free_problem, pack

        p = self.project
        packing, setting = p["dataset.packing"], p["dataset.padding_free"]
        problem = model_padding_free_problem(model) if setting is not False else None
        if problem and (packing or setting is True):
            key = "dataset.packing = true" if packing else "dataset.padding_free = true"
            fix = "dataset.packing = false" if packing else 'dataset.padding_free = "auto" (batches are padded)'
            raise UserError(f"{key} needs a model that attends to each packed row alone, but {problem}; set {fix}")
        padding_free = setting is not False and problem is None
        rows = len(train)
        if packing:
            train = pack(train, p["dataset.max_length"])
        layout = "packed" if packing else "padding-free" if padding_free else "padded"
        data_info["batching"] = {"layout": layout, "rows": rows, "examples": len(train), "why_padded": problem}
        return Dataset.from_list(train), Dataset.from_list(eval_rows) if eval_rows is not None else None, padding_free

    def _trainer(self, model: Any, tokenizer: Any, train_rows: list[dict[str, Any]],
                 eval_rows: list[dict[str, Any]] | None, data_info: dict[str, Any]) -> Any:
        from trl import SFTConfig

        from .batching import ROWS_ATTENTION, BatchCollator, add_compact_head, use_rows_attention
        from .resolve import installed

        p, r = self.project, self.resolved
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if p["training.method"] != "sft":
            return self._preference_trainer(model, tokenizer, train_rows, eval_rows, data_info)
        train_ds, eval_ds, padding_free = self._batching(model, train_rows, eval_rows, data_info)
        compact = r.device != "cuda" or not installed("triton")
        data_info["loss"] = "compact head" if compact else "trl fused head"
        args = SFTConfig(
            **self._common_args(eval_ds is not None),
            use_liger_kernel=r.kernels == "liger",
            # padding-free batches hold no padding: every token counts (the pad id may also be a real eos)
            include_num_input_tokens_seen="all" if padding_free else "non_padding",
            # padded batches: rows of similar length together, so little is padded
            train_sampling_strategy="random" if padding_free else "group_by_length",
            # DDP: every adapter gets a gradient each step, except the experts a mixture-of-experts
            # model did not route to; looking for unused ones costs a pass over the graph
            ddp_find_unused_parameters=is_moe(model.config) if self.world_size > 1 else None,
            max_length=p["dataset.max_length"],
            packing=False,  # tunedeck packs (tunedeck.core.batching.pack): the labels stay its own
            # the examples are rendered, masked and truncated by tunedeck.core.render: trl leaves them as they are
            dataset_kwargs={"skip_prepare_dataset": True},
        )
        if padding_free:
            use_rows_attention(model, p["dataset.max_length"])  # sdpa row by row, not over a block mask
        data_info["attention"] = str(getattr(model.config, "_attn_implementation", None))
        self.callback = EventsCallback(self, data_info)
        varlen = data_info["attention"] == ROWS_ATTENTION or "flash" in data_info["attention"]
        collator = BatchCollator(tokenizer.pad_token_id, padding_free=padding_free, varlen_kwargs=padding_free and varlen)
        trainer = trainer_class()(
            model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
            data_collator=collator, callbacks=[self.callback],
        )
        trainer.remove_callback(PrinterCallback)  # its log dicts on stdout; the events carry them
        upcast_trainable(trainer.model)
        if r.precision in ("bf16", "fp16"):
            keep_input_dtype(trainer.model)
        if compact:
            add_compact_head(trainer.model)
            trainer.compact_head = True
        return trainer

    def _common_args(self, has_eval: bool) -> dict[str, Any]:
        """The training arguments every method shares (trl's configs take them all)."""
        p, r = self.project, self.resolved
        eval_steps, save_steps = p["training.eval_steps"], p["training.save_steps"]
        return dict(
            output_dir=str(self.run_dir / CHECKPOINTS),
            num_train_epochs=p["training.epochs"],
            max_steps=p["training.max_steps"],
            per_device_train_batch_size=p["training.batch_size"],
            per_device_eval_batch_size=p["training.batch_size"],
            gradient_accumulation_steps=p["training.grad_accum"],
            learning_rate=p["training.learning_rate"],
            lr_scheduler_type=p["training.lr_scheduler"],
            warmup_steps=min(p["training.warmup_ratio"], 0.9999),  # a float < 1 is a ratio of the total steps
            optim=p["training.optim"],
            weight_decay=p["training.weight_decay"],
            max_grad_norm=p["training.max_grad_norm"],
            seed=p["training.seed"],
            data_seed=p["training.seed"],
            bf16=r.precision == "bf16",
            fp16=r.precision == "fp16",
            activation_checkpointing=r.gradient_checkpointing,  # transformers 5's name for gradient checkpointing
            use_cpu=r.device == "cpu",
            logging_strategy="steps",
            logging_steps=p["training.logging_steps"],
            logging_nan_inf_filter=False,  # NaN losses are reported, not averaged away
            eval_strategy=("steps" if eval_steps else "epoch") if has_eval else "no",
            eval_steps=eval_steps or None,
            save_strategy="steps" if save_steps else "epoch",
            save_steps=save_steps or 500,
            save_total_limit=p["training.save_total_limit"],
            prediction_loss_only=True,
            report_to="none",
            disable_tqdm=True,
            dataloader_pin_memory=r.device == "cuda",
        )

    def _preference_trainer(self, model: Any, tokenizer: Any, train_rows: list[dict[str, Any]],
                            eval_rows: list[dict[str, Any]] | None, data_info: dict[str, Any]) -> Any:
        """trl's DPOTrainer on the rendered pairs (:mod:`tunedeck.core.preftrain`): DPO, or ORPO's loss."""
        from datasets import Dataset
        from trl import DPOConfig

        from .preftrain import PairCollator, drop_fresh_reference, loss_types, preference_trainer_class

        p, r = self.project, self.resolved
        method = p["training.method"]
        types, weights = loss_types(p)
        args = DPOConfig(
            **self._common_args(eval_rows is not None),
            beta=p["preference.beta"],
            loss_type=types,
            loss_weights=weights,
            label_smoothing=p["preference.label_smoothing"],
            max_length=None,  # rendered and truncated by tunedeck
            padding_free=False,
            remove_unused_columns=False,
            include_num_input_tokens_seen="non_padding",
            ddp_find_unused_parameters=is_moe(model.config) if self.world_size > 1 else None,
        )
        continued = bool(p["model.adapter"])
        data_info["batching"] = {"layout": "pairs", "rows": len(train_rows), "examples": len(train_rows),
                                 "why_padded": "chosen and rejected answers of a pair are batched side by side"}
        data_info["loss"] = "orpo" if method == "orpo" else "+".join(types)
        data_info["reference"] = (None if method == "orpo" else
                                  "the adapter it started from (frozen copy)" if continued else
                                  "the base model (adapter disabled)")
        data_info["attention"] = str(getattr(model.config, "_attn_implementation", None))
        self.callback = EventsCallback(self, data_info)
        cls = preference_trainer_class()
        cls_for_run = type(f"{method.upper()}Trainer", (cls,), {"method": method})
        trainer = cls_for_run(
            model=model, args=args, train_dataset=Dataset.from_list(train_rows),
            eval_dataset=Dataset.from_list(eval_rows) if eval_rows is not None else None,
            processing_class=tokenizer, data_collator=PairCollator(tokenizer.pad_token_id),
            callbacks=[self.callback],
        )
        if method == "orpo" or not continued:
            drop_fresh_reference(trainer.model)
        trainer.remove_callback(PrinterCallback)
        upcast_trainable(trainer.model)
        if r.precision in ("bf16", "fp16"):
            keep_input_dtype(trainer.model)
        return trainer

    # -- the end ----------------------------------------------------------------------------

    def _finish(self, trainer: Any, has_eval: bool) -> dict[str, Any]:
        cb = self.callback
        step = trainer.state.global_step
        if cb.diverged:
            return self.emit(FAILED, step, reason=f"training diverged: the loss was NaN/inf for {NAN_LIMIT} logged "
                             "steps in a row; lower training.learning_rate or use precision fp32",
                             traceback=None, user_error=False, diverged=True)
        if has_eval and cb.last_eval_step != step and not self.controls.stop.is_set():
            trainer.evaluate()
        adapter = self.run_dir / ADAPTER
        trainer.save_model(str(adapter))  # rank 0 writes; gathers shards under FSDP / DeepSpeed
        if trainer.is_world_process_zero():
            (adapter / "training_args.bin").unlink(missing_ok=True)  # a pickle; the snapshot holds the settings
            # DPO's frozen reference (the adapter the run started from, model.adapter names it): not the run's
            shutil.rmtree(adapter / "ref", ignore_errors=True)
        self.emit(SYSTEM, step, **cb.system())
        tokens = trainer.state.num_input_tokens_seen - cb.tokens_at_start
        runtime = cb.train_runtime or (time.time() - cb.t_begin)
        return self.emit(
            FINISHED, step, adapter=str(adapter), run_dir=str(self.run_dir),
            checkpoints=str(self.run_dir / CHECKPOINTS), final_loss=cb.last_loss, train_loss=cb.train_loss,
            runtime_s=runtime, tokens=tokens, tokens_per_s=tokens / runtime if runtime > 0 else None,
            stopped=self.controls.stop.is_set(),
        )

    def _write_env(self) -> None:
        import torch

        device: dict[str, Any] = {"type": self.resolved.device, "hardware": self.resolved.hardware,
                                  "torch_threads": torch.get_num_threads()}
        if torch.cuda.is_available():
            device["cuda"] = torch.version.cuda
            device["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env = {"versions": library_versions(), "device": device, "platform": platform.platform(),
               "host": socket.gethostname(), "world_size": self.world_size, "time": time.time()}
        self.env = env
        (self.run_dir / ENV_FILE).write_text(json.dumps(env, indent=2) + "\n", encoding="utf-8")


def use_flash_attention(model: Any) -> None:
    """flash-attention's varlen kernels for padding-free batches, where the package is installed
    and the model supports it; sdpa (row by row) otherwise."""
    from .resolve import installed

    if not installed("flash_attn"):
        return
    try:
        model.set_attn_implementation("flash_attention_2")
    except (ValueError, ImportError, AttributeError):  # not for this model or GPU: sdpa stays
        pass


@functools.cache
def trainer_class() -> Any:
    """trl's SFTTrainer with the compact head's loss (:func:`tunedeck.core.batching.add_compact_head`)
    where it is on; trl's own loss elsewhere."""
    from trl import SFTTrainer

    class Trainer(SFTTrainer):
        compact_head = False

        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            if (not self.compact_head or self.aux_loss_enabled or self.compute_loss_func is not None
                    or self.label_smoother is not None):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            mode = "train" if self.model.training else "eval"
            outputs = model(**inputs, use_cache=False, compact_head=True, num_items_in_batch=num_items_in_batch)
            loss = outputs.loss
            # like Trainer.compute_loss: num_items_in_batch counts every rank's tokens, DDP averages the gradients
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            gather = self.accelerator.gather_for_metrics
            valid = gather(outputs.tokens.detach()).sum()
            entropy = gather(outputs.entropy_sum.detach().reshape(1)).sum()
            correct = gather(outputs.correct.detach().reshape(1)).sum()
            self._metrics[mode]["entropy"].append((entropy / valid).item() if valid > 0 else 0.0)
            self._metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
            return (loss, outputs) if return_outputs else loss

    return Trainer


def sharded() -> bool:
    """Whether accelerate shards the model over the processes (FSDP, DeepSpeed ZeRO-3)."""
    return (os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
            or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3")


MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")


def is_moe(config: Any) -> bool:
    """A mixture-of-experts model (its config counts experts)."""
    return any(isinstance(getattr(config, key, None), int) and getattr(config, key) > 1 for key in MOE_KEYS)


def linear_module_names(model: Any) -> list[str]:
    """The distinct last name parts of the model's linear layers (what target_modules matches)."""
    import torch

    names: dict[str, None] = {}
    for name, module in model.named_modules():
        if not name or list(module.children()):
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            names[name.rsplit(".", 1)[-1]] = None
    return list(names)


def upcast_trainable(model: Any) -> None:
    """Keep the trainable (adapter) weights in fp32 while the frozen base stays in the training
    precision: fp32 master weights for the optimizer (trl would leave QLoRA adapters in bf16,
    and fp16 AMP cannot unscale fp16 gradients)."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def keep_input_dtype(model: Any) -> None:
    """Under mixed precision, the adapters take their input as it comes (bf16/fp16) instead of
    peft casting it to their fp32 weights' dtype first: autocast runs their matmuls in the
    training precision either way, so the cast (and dropout on the fp32 copy) is work thrown
    away, about a tenth of a step on a CPU."""
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False


def check_trainable(trainable: int, target: Any) -> None:
    if trainable == 0:
        raise UserError(f"lora.target_modules = {_toml(target)} leaves no trainable parameter; "
                        "target linear layers (e.g. \"all-linear\")")


def _toml(value: Any) -> str:
    from .schema import toml_repr

    return toml_repr(value)


class EventsCallback(TrainerCallback):
    """Turns the trainer's progress into events and the parent's requests into control flags."""

    def __init__(self, run: Run, data_info: dict[str, Any]) -> None:
        self.run = run
        self.emit = run.emit
        self.controls = run.controls
        self.data_info = data_info
        self.resumed_from: Path | None = None
        self.t_begin = time.time()
        self.t_last_log = self.t_begin
        self.tokens_last_log = 0
        self.tokens_at_start = 0
        self.step_at_start = 0
        self.last_loss: float | None = None
        self.train_loss: float | None = None
        self.train_runtime: float | None = None
        self.last_eval_step = -1
        self.last_saved_step = -1
        self.bad_losses = 0
        self.diverged = False
        self.t_system = 0.0

    # -- events -----------------------------------------------------------------------------

    def system(self) -> dict[str, Any]:
        """The system event's fields, and ``rss_peak``: this process's peak resident memory
        since training began (Linux; None elsewhere)."""
        import torch

        if torch.cuda.is_available():
            index = torch.cuda.current_device()
            fields = system_fields(index, int(torch.cuda.max_memory_allocated(index)),
                                   torch_reserved=int(torch.cuda.memory_reserved(index)),
                                   torch_allocated=int(torch.cuda.memory_allocated(index)))
        else:
            fields = system_fields(None, None)
        return {**fields, "rss_peak": rss_peak()}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import torch

        if torch.cuda.is_available():  # the peak of training, not of loading the model
            torch.cuda.reset_peak_memory_stats(torch.cuda.current_device())
        reset_rss_peak()
        self.t_begin = self.t_last_log = self.t_system = time.time()
        self.step_at_start = state.global_step
        self.tokens_at_start = self.tokens_last_log = state.num_input_tokens_seen
        run = self.run
        trainable, total = run.params
        resumed = {"checkpoint": str(self.resumed_from), "step": state.global_step} if self.resumed_from else None
        self.emit(
            RUN_STARTED, state.global_step, name=run.spec.name, run_dir=str(run.run_dir),
            project=run.spec.project_path, config=run.project.as_dict(), resolved=run.resolved.as_dict(),
            versions=run.env.get("versions") or library_versions(),
            device=run.env.get("device", {"type": run.resolved.device}),
            trainable_params=trainable, total_params=total, max_steps=state.max_steps,
            train_rows=self.data_info["train"]["kept"],
            eval_rows=(self.data_info["eval"] or {}).get("kept", 0), data=self.data_info,
            world_size=run.world_size, resumed_from=resumed, pid=os.getpid(),
            memory_estimate=run.memory_estimate,
        )
        self.emit(SYSTEM, state.global_step, **self.system())

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        if "train_loss" in logs:  # the summary at the end of train()
            self.train_runtime = _float(logs.get("train_runtime"))
            self.train_loss = _float(logs.get("train_loss"))
            return
        if "loss" not in logs:
            return
        now = time.time()
        tokens = state.num_input_tokens_seen
        elapsed = now - self.t_last_log
        rate = (tokens - self.tokens_last_log) / elapsed if elapsed > 0 else None
        self.t_last_log, self.tokens_last_log = now, tokens
        done = state.global_step - self.step_at_start
        per_step = (now - self.t_begin) / done if done > 0 else None
        eta = per_step * (state.max_steps - state.global_step) if per_step is not None else None
        loss = _float(logs.get("loss"))
        from .preftrain import event_metrics

        extra = {k: _float(logs[k]) for k in ("mean_token_accuracy", "entropy") if k in logs}
        extra.update({k: _float(v) for k, v in event_metrics(logs).items()})
        self.emit(STEP, state.global_step, loss=loss, learning_rate=_float(logs.get("learning_rate")),
                  grad_norm=_float(logs.get("grad_norm")), tokens=tokens, tokens_per_s=rate,
                  epoch=_float(logs.get("epoch")),
                  eta_s=eta, max_steps=state.max_steps, **extra)
        if loss is None or not math.isfinite(loss):
            self.bad_losses += 1
            self.emit.warn(f"the loss is {loss if loss is not None else 'NaN'} at step {state.global_step}")
            if self.bad_losses >= NAN_LIMIT:
                self.diverged = True
                control.should_training_stop = True
                control.should_save = False
        else:
            self.last_loss = loss
            self.bad_losses = 0

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None,
                    **kwargs: Any) -> None:
        from .preftrain import METRICS as PREFERENCE_METRICS, event_metrics

        metrics = {k: v for k, v in (metrics or {}).items() if k.startswith("eval_")}
        named = event_metrics(metrics, "eval_")  # a preference run's, under the step events' names
        mapped = {"eval_" + k for k in PREFERENCE_METRICS}
        metrics = {**{k.replace("/", "_"): _float(v) for k, v in metrics.items() if k not in mapped},
                   **{k: _float(v) for k, v in named.items()}}
        self.last_eval_step = state.global_step
        self.emit(EVAL, state.global_step, **metrics)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.last_saved_step = state.global_step
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.emit(CHECKPOINT, state.global_step, path=str(path))

    # -- control ----------------------------------------------------------------------------

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        stop, save = self.agreed_controls(args)
        if stop:
            control.should_training_stop = True
            control.should_save = True
        if save:
            control.should_save = True
        if state.global_step >= state.max_steps:
            control.should_save = True  # a final checkpoint, so the run can be resumed for more steps
        now = time.time()
        if now - self.t_system >= SYSTEM_EVERY_S:
            self.t_system = now
            self.emit(SYSTEM, state.global_step, **self.system())

    def agreed_controls(self, args: Any) -> tuple[bool, bool]:
        """(stop, save) as rank 0 took them, the same on every rank: under several processes
        rank 0 sends its flags to all at each step, so they stop and save together."""
        c = self.controls
        flags = [int(c.stop.is_set()), int(c.save.is_set())]
        c.save.clear()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            sent = torch.tensor(flags, dtype=torch.int32, device=args.device)
            dist.broadcast(sent, src=0)
            flags = [int(v) for v in sent.tolist()]
            if flags[0]:
                c.stop.set()
        return bool(flags[0]), bool(flags[1])

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.diverged:
            control.should_save = control.should_evaluate = False
        elif control.should_save and state.global_step == self.last_saved_step:
            control.should_save = False  # saved at this step already


def reset_rss_peak() -> None:
    """Start this process's resident-memory high-water mark (VmHWM) afresh (Linux), so that
    it measures training rather than loading the model. /proc by hand: psutil has no peak RSS
    on Linux, and getrusage's ru_maxrss cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        pass


def rss_peak() -> int | None:
    """This process's peak resident memory in bytes since :func:`reset_rss_peak` (VmHWM in
    /proc/self/status: psutil does not report it), or None where there is no such file."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
