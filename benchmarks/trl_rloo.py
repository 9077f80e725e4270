"""The TRL RLOO row of ``step_time.py``: one optimizer step of TRL's ``RLOOTrainer`` on dmtune's
prior, batch and constraint. Needs ``trl``, which is not a dependency of dmtune:

    python -m venv --system-site-packages /tmp/trlvenv && /tmp/trlvenv/bin/pip install trl
    /tmp/trlvenv/bin/python benchmarks/step_time.py        # every row, TRL's included
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dmtune.sampling import Samples, decode_texts
from dmtune.trainer import Trainer

# TRL's KL coefficient for the RLOO row (its default; dmtune's GDC++ has none)
TRL_BETA = 0.05


def rloo_step_time(trainer: Trainer, args: argparse.Namespace) -> tuple[float, dict[str, Any]]:
    """Median seconds of one TRL ``RLOOTrainer`` optimizer step, and the settings it ran with.

    The same prior (dmtune's, saved to a temporary folder: TRL loads the policy and its reference
    model from a path), the same ``batch_size`` samples per step as one group of the BOS prompt
    (the leave-one-out baseline over the whole batch), ancestral sampling of ≤ ``max_new_tokens``,
    the loss in micro-batches of ``train.micro_batch_size`` (gradient accumulation), dmtune's lr,
    betas, gradient clipping and weights dtype, and as reward the run's constraint (dmtune's own
    scorer, ``Target.score(...).reward``: 1 when every pointwise constraint holds). TRL runs its
    own loop, so ``train()`` runs ``warmup + repeats`` steps and a callback times each from
    ``on_step_begin`` (before generation) to ``on_step_end`` (after the optimizer step); the
    median is over the steps after warm-up. TRL's defaults that dmtune does not share are turned
    off: gradient checkpointing, bf16 autocast, logging and checkpoints.
    """
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    lm, target, config = trainer.lm, trainer.target, trainer.config
    tokenizer = lm.tokenizer
    micro = min(config.micro_batch_size or args.batch_size, args.batch_size)
    if args.batch_size % micro:  # TRL accumulates whole micro-batches only
        micro = args.batch_size
    steps = args.warmup + args.repeats

    def reward(completion_ids: list[list[int]], **_: Any) -> list[float]:
        width = max(len(ids) for ids in completion_ids)
        tokens = torch.full((len(completion_ids), width), lm.filler_id, dtype=torch.long)
        mask = torch.zeros_like(tokens)
        for row, ids in enumerate(completion_ids):
            tokens[row, : len(ids)], mask[row, : len(ids)] = torch.tensor(ids), 1
        prompt_ids, prompt_mask = lm.encode_prompts(len(completion_ids))
        samples = Samples(
            prompt_ids.cpu(), prompt_mask.cpu(), tokens, mask, torch.zeros(len(tokens)),
            decode_texts(tokenizer, tokens, mask),
        )
        return target.score(samples).reward.tolist()

    step_times: list[float] = []
    logged: dict[str, float] = {}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            step_times.append(time.perf_counter() - self.started)

        def on_log(self, *_: Any, logs: dict[str, float], **__: Any) -> None:
            logged.update(logs)

    settings = {
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": args.batch_size // micro,
        "num_generations": args.batch_size,
        "max_completion_length": args.max_new_tokens,
        "temperature": 1.0, "top_k": 0, "top_p": 1.0,
        "beta": TRL_BETA,
        "num_iterations": 1,
        "learning_rate": config.lr,
        "adam_beta1": config.betas[0], "adam_beta2": config.betas[1],
        "weight_decay": config.weight_decay,
        "max_grad_norm": config.grad_clip,
        "lr_scheduler_type": "constant",
        "gradient_checkpointing": False,
        "bf16": False,
        "fp16": False,
        "seed": 0,
    }
    with tempfile.TemporaryDirectory() as folder:
        prior_dir = Path(folder) / "prior"
        trainer.prior.save_pretrained(prior_dir)
        tokenizer.save_pretrained(prior_dir)
        rloo = RLOOTrainer(
            model=str(prior_dir),
            reward_funcs=reward,
            args=RLOOConfig(
                output_dir=str(Path(folder) / "out"), max_steps=steps, report_to="none",
                logging_steps=steps, save_strategy="no", disable_tqdm=True,
                use_cpu=trainer.device.type == "cpu",
                model_init_kwargs={"dtype": trainer.policy.dtype},
                **settings,
            ),
            train_dataset=Dataset.from_dict({"prompt": [tokenizer.bos_token] * steps}),
            processing_class=tokenizer,
            callbacks=[StepTimer()],
        )
        rloo.train()
    import trl

    settings["trl"] = trl.__version__
    settings["mean_new_tokens"] = logged.get("completions/mean_length")  # EOS included
    settings["warmup_steps_untimed"] = args.warmup
    settings["steps_timed"] = len(step_times[args.warmup :])
    return statistics.median(step_times[args.warmup :]), settings

