"""Step time: dmtune's step beside Hugging Face ``generate`` and the naive floor, in one run.

On one prior and one batch (the prompt is BOS alone, ancestral sampling), times the median of
several calls after warm-up of:

- HF generate: ``model.generate(do_sample=True, top_k=0)`` with its KV cache, the batch at once;
- naive fwd/bwd: one forward with the LM loss and one backward over generate's sequences;
- naive floor: the two together (what any RL fine-tuning step costs at least);
- dmtune sample: the trainer's sampler (``log q`` included); with ``--compile-sampler`` also
  through its compiled decode step and static KV cache (``train.compile_sampler``; the first
  call, which compiles, is reported apart);
- dmtune step: a whole step of the default objective (GDC++) on the run's constraint, split into
  sample / score / update, at the configured ``train.micro_batch_size`` and in one pass (0);
- TRL RLOO step (when ``trl`` is importable; it is not a dependency of dmtune): one optimizer step
  of TRL's ``RLOOTrainer`` on the same prior, samples, tokens and micro-batches, its reward the
  run's constraint, β = 0.05 (``trl_rloo.py``);

and prints each as a ratio to generate and to the floor. ``--profile`` adds the top operators
of one dmtune step; ``--memory`` measures the peak resident memory of a step at several micro-
batch sizes, each in its own process.

    python benchmarks/step_time.py                                    # tiny prior, 256 × 32
    python benchmarks/step_time.py --model smollm2 --batch-size 32    # SmolLM2-135M, 32 × 32
    python benchmarks/step_time.py --memory 0,16,64,256               # peak RSS per micro-batch
    python benchmarks/step_time.py --smoke                            # the toy, seconds (tests)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

from dmtune.build import build_trainer
from dmtune.overrides import compose_config
from dmtune.trainer import Trainer

RESULTS = Path(__file__).parent / "results"


def load_sibling(name: str) -> Any:
    """A module of this folder (the script also runs loaded by path, as the tests do)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def median_time(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def build(args: argparse.Namespace, micro_batch_size: int | None = None) -> Trainer:
    overrides = [
        "logger=none",
        f"model={args.model}",
        f"train.batch_size={args.batch_size}",
        f"train.max_new_tokens={args.max_new_tokens}",
        f"train.fit_samples={args.batch_size}",
        f"device={args.device}",
        *args.overrides,
    ]
    if micro_batch_size is not None:
        overrides.append(f"train.micro_batch_size={micro_batch_size}")
    trainer = build_trainer(compose_config(overrides))
    trainer.calibrate()
    return trainer


def naive_floor(trainer: Trainer, args: argparse.Namespace) -> tuple[Callable, Callable]:
    """HF ``generate`` of the batch, and one LM-loss forward/backward over its sequences."""
    model, lm = trainer.policy, trainer.lm
    prompt_ids, prompt_mask = lm.encode_prompts(args.batch_size)
    eos = lm.tokenizer.eos_token_id
    sequences: list[torch.Tensor] = []

    def generate() -> None:
        with torch.no_grad(), lm.autocast():
            out = model.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, top_k=0,
                top_p=1.0, temperature=1.0, max_new_tokens=args.max_new_tokens,
                pad_token_id=lm.filler_id, eos_token_id=eos,
            )
        sequences[:] = [out]

    def forward_backward() -> None:
        (out,) = sequences
        new = out[:, prompt_ids.shape[1] :]
        # generated tokens up to and including the first EOS
        ended = (new == eos).long().cumsum(-1)
        keep = (ended == 0) | ((ended == 1) & (new == eos))
        mask = torch.cat([prompt_mask, keep.long()], 1)
        labels = out.masked_fill(mask == 0, -100)
        model.zero_grad(set_to_none=True)
        with lm.autocast():
            logits = model(input_ids=out, attention_mask=mask).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
        )
        loss.backward()

    return generate, forward_backward


def profile_step(trainer: Trainer, rows: int = 20) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if trainer.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        trainer.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def machine() -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def time_rows(args: argparse.Namespace) -> dict[str, Any]:
    trainer = build(args)
    micro = trainer.config.micro_batch_size
    generate, forward_backward = naive_floor(trainer, args)
    rows: dict[str, float] = {}
    rows["HF generate"] = median_time(generate, args.warmup, args.repeats)
    rows["naive fwd/bwd"] = median_time(forward_backward, args.warmup, args.repeats)
    rows["naive floor"] = rows["HF generate"] + rows["naive fwd/bwd"]
    rows["dmtune sample"] = median_time(trainer.sample, args.warmup, args.repeats)
    compile_s = None
    if args.compile_sampler:
        trainer.config.compile_sampler = True
        started = time.perf_counter()
        trainer.sample()
        compile_s = time.perf_counter() - started
        rows["dmtune sample (compiled decode step)"] = median_time(
            trainer.sample, args.warmup, args.repeats
        )
        trainer.config.compile_sampler = False
    splits = []

    def step() -> None:
        splits.append(trainer.step())

    rows[f"dmtune step (micro-batch {micro})"] = median_time(step, args.warmup, args.repeats)
    measured = splits[args.warmup :]
    for part in ("sample", "score", "update"):
        rows[f"  {part}"] = statistics.median(s[f"perf/{part}_s"] for s in measured)
    trainer.config.micro_batch_size = 0
    rows["dmtune step (one pass)"] = median_time(step, args.warmup, args.repeats)
    trainer.config.micro_batch_size = micro
    dmtune_step = rows[f"dmtune step (micro-batch {micro})"]
    trl_settings = None
    if importlib.util.find_spec("trl") is not None and not args.no_trl:
        rows["TRL RLOO step"], trl_settings = load_sibling("trl_rloo").rloo_step_time(trainer, args)
    result = {
        "model": args.model,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "mean_new_tokens": float(trainer.last_samples.mask.sum(-1).float().mean()),
        "device": str(trainer.device),
        "machine": machine(),
        "repeats": args.repeats,
        "seconds": rows,
        "vs_generate": {k: v / rows["HF generate"] for k, v in rows.items()},
        "vs_floor": {k: v / rows["naive floor"] for k, v in rows.items()},
    }
    if compile_s is not None:
        result["compiled_sampler_first_call_s"] = compile_s
    if trl_settings is not None:
        result["trl_rloo"] = trl_settings
        result["dmtune_step_vs_trl_rloo"] = dmtune_step / rows["TRL RLOO step"]
    if args.profile:
        result["profile"] = profile_step(trainer)
    return result


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['model']}, {result['batch_size']} samples × ≤{result['max_new_tokens']} tokens "
        f"(mean {result['mean_new_tokens']:.1f}), {result['device']}, "
        f"{result['machine']['torch_threads']} threads, median of {result['repeats']}",
        "",
        "| | median s | × HF generate | × naive floor |",
        "|---|---|---|---|",
    ]
    for name, seconds in result["seconds"].items():
        lines.append(
            f"| {name} | {seconds:.3f} | {result['vs_generate'][name]:.2f} "
            f"| {result['vs_floor'][name]:.2f} |"
        )
    if "trl_rloo" in result:
        trl = result["trl_rloo"]
        lines += [
            "",
            f"dmtune step / TRL RLOO step: {result['dmtune_step_vs_trl_rloo']:.2f} "
            f"(TRL {trl['trl']}: {trl['num_generations']} samples per step as one group, "
            f"≤{trl['max_completion_length']} tokens (mean {trl['mean_new_tokens']:.1f}), "
            "micro-batches of "
            f"{trl['per_device_train_batch_size']} × {trl['gradient_accumulation_steps']} "
            f"accumulated, β = {trl['beta']}, lr {trl['learning_rate']}, clip "
            f"{trl['max_grad_norm']}, float32, no gradient checkpointing; reward = the run's "
            f"constraint; median of {trl['steps_timed']} steps of train() after "
            f"{trl['warmup_steps_untimed']} untimed, each from step begin to step end)",
        ]
    return "\n".join(lines)


def peak_memory(args: argparse.Namespace, micro_batch_size: int) -> float:
    """Peak RSS (MiB) of a process that builds the run and takes two steps."""
    trainer = build(args, micro_batch_size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        trainer.step()
    if trainer.device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(after, before) / 1024  # ru_maxrss is in KiB on Linux


def memory_rows(args: argparse.Namespace) -> dict[str, Any]:
    peaks = {}
    for micro in args.memory:
        command = [sys.executable, __file__, "--peak-memory-of", str(micro), *passthrough(args)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        peaks[micro] = float(out.strip().splitlines()[-1])
    return {
        "model": args.model, "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens, "machine": machine(),
        "peak_mib": peaks,
    }


def passthrough(args: argparse.Namespace) -> list[str]:
    return [
        "--model", args.model, "--batch-size", str(args.batch_size),
        "--max-new-tokens", str(args.max_new_tokens), "--device", args.device,
        *[a for o in args.overrides for a in ("--override", o)],
    ]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="a model option: tiny, smollm2, gpt2 ...")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="auto", help="a device option: auto, cpu, cuda")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="add one step's top operators")
    parser.add_argument(
        "--memory", type=lambda s: [int(x) for x in s.split(",")], default=None,
        help="micro-batch sizes whose peak memory to measure (one process each), e.g. 0,16,64",
    )
    parser.add_argument("--override", dest="overrides", action="append", default=[],
                        help="any dmtune override, e.g. objective=kl_dpg (repeatable)")
    parser.add_argument("--compile-sampler", action="store_true",
                        help="add the sampler through its compiled decode step")
    parser.add_argument("--no-trl", action="store_true",
                        help="skip the TRL RLOO row even when trl is importable")
    parser.add_argument("--smoke", action="store_true",
                        help="the toy prior, 16 × 4, 1 repeat: checks that the script runs")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: results/)")
    parser.add_argument("--peak-memory-of", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.batch_size, args.max_new_tokens = "toy", 16, 4
        args.warmup, args.repeats = 1, 1
        args.overrides = ["constraint=toy_token", *args.overrides]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.peak_memory_of is not None:
        print(peak_memory(args, args.peak_memory_of))
        return {}
    if args.memory:
        result = memory_rows(args)
        lines = [f"| micro_batch_size | peak MiB ({result['model']}, {args.batch_size} × "
                 f"{args.max_new_tokens}) |", "|---|---|"]
        lines += [f"| {k or 'whole batch'} | {v:.0f} |" for k, v in result["peak_mib"].items()]
        text, name = "\n".join(lines), f"step_memory_{args.model}"
    else:
        result = time_rows(args)
        text, name = table(result), f"step_time_{args.model}"
        if "profile" in result:
            text += "\n\nOne dmtune step, top operators:\n" + result["profile"]
    print(text)
    if not args.smoke or args.out:
        out = args.out or RESULTS / f"{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".txt").write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
