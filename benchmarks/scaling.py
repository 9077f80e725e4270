"""Throughput of a run on 1 and N processes (data parallel: DDP or FSDP), with and without LoRA.

Runs ``dmtune train`` for each setting (W&B off) and reads its metrics.jsonl: the median step
time after ``--warmup`` steps, samples/s and tokens/s of the whole batch, and the model FLOPs
utilisation when ``--peak-tflops`` (the hardware's peak per device) is given:
``MFU = 8 · parameters · tokens/s / (processes · peak)`` — a step runs the policy forward twice
(sampling, with its KV cache, and the update) and backward once (≈ 2 + 2 + 4 FLOPs per
parameter and token; scoring by the prior adds 2 more and is left out, as is attention).
Peak memory: the largest resident set of any one process of the run (CPU), or rank 0's
``torch.cuda`` peak (GPU, the run's ``perf/gpu_peak_gib``); training state: what rank 0 holds of
the policy's trainable weights, gradients and AdamW moments (``perf/state_mib``; FSDP: 1/N).

    python benchmarks/scaling.py                                  # tiny prior, CPU, 1 and 2
    python benchmarks/scaling.py --model gpt2 --batch-size 512 --max-new-tokens 40 \\
        --device cuda --processes 1,8 --lora 0,16 --peak-tflops 989  # size=paper on 8 H100s
    python benchmarks/scaling.py --model smollm2 --strategies ddp,fsdp --lora 0  # sharded
    python benchmarks/scaling.py --smoke                          # the toy, seconds (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
# runs argv[1:], then prints the largest resident set of any process below it (KiB)
_PEAK_OF_CHILDREN = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
    "sys.exit(code)"
)


def run(
    args: argparse.Namespace, processes: int, lora: int, run_dir: Path, strategy: str = "ddp"
) -> dict[str, Any]:
    overrides = [
        f"model={args.model}", f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
        f"train.max_new_tokens={args.max_new_tokens}",
        f"train.fit_samples={args.fit_samples or args.batch_size}",
        "logger=none", f"device.name={args.device}", f"model.lora.r={lora}",
        f"train.checkpoint_every={args.steps}", f"hydra.run.dir={run_dir}",
        *([f"device={strategy}", f"device.num_processes={processes}"] if processes > 1 else []),
        *(["device.dtype=bfloat16"] if args.device == "cuda" else []),
        *args.overrides,
    ]
    started = time.perf_counter()
    done = subprocess.run(  # through a parent of its own: its children's peak is this run's
        [sys.executable, "-c", _PEAK_OF_CHILDREN, sys.executable, "-m", "dmtune", "train",
         *overrides],
        capture_output=True, text=True, timeout=args.timeout,
    )
    if done.returncode != 0:
        raise SystemExit(f"dmtune train {' '.join(overrides)} failed:\n{done.stderr[-2000:]}")
    peak_kib = int(done.stderr.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if row["step"] > args.warmup]
    step_s = statistics.median(row["perf/step_s"] for row in steps)
    tokens_s = statistics.median(row["perf/tokens_per_s"] for row in steps)
    result = {
        "processes": processes,
        "strategy": strategy if processes > 1 else "-",
        "lora_r": lora,
        "step_s": step_s,
        "samples_per_s": args.batch_size / step_s,
        "tokens_per_s": tokens_s,
        "wall_s": time.perf_counter() - started,
        "peak_rss_mib": peak_kib / 1024,
        "state_mib": steps[-1]["perf/state_mib"],
    }
    gpu = [row["perf/gpu_peak_gib"] for row in steps if "perf/gpu_peak_gib" in row]
    if gpu:
        result["gpu_peak_gib"] = max(gpu)
    if args.peak_tflops:
        params = _parameters(run_dir)
        result["mfu"] = 8 * params * tokens_s / (processes * args.peak_tflops * 1e12)
    return result


def _parameters(run_dir: Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    policy = run_dir / "policy"
    path = policy / "merged" if (policy / "merged").is_dir() else policy
    if (policy / "adapter_config.json").is_file():  # LoRA: the base model's size counts
        path = json.loads((policy / "adapter_config.json").read_text())["base_model_name_or_path"]
    with __import__("torch").device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return sum(p.numel() for p in model.parameters())


def table(result: dict[str, Any]) -> str:
    head = (
        "| processes | strategy | LoRA r | step s | samples/s | tokens/s | ×1 process "
        "| peak memory | training state / process | MFU |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    base = {row["lora_r"]: row["samples_per_s"] for row in result["rows"] if row["processes"] == 1}
    for row in result["rows"]:
        ratio = row["samples_per_s"] / base[row["lora_r"]] if row["lora_r"] in base else None
        memory = (
            f"{row['gpu_peak_gib']:.1f} GiB GPU" if "gpu_peak_gib" in row
            else f"{row['peak_rss_mib']:.0f} MiB RSS"
        )
        shown_ratio = "-" if ratio is None else format(ratio, ".2f")
        mfu = format(row["mfu"], ".1%") if "mfu" in row else "-"
        lines.append(
            f"| {row['processes']} | {row.get('strategy', '-')} | {row['lora_r'] or '-'} | "
            f"{row['step_s']:.3f} | {row['samples_per_s']:.1f} | {row['tokens_per_s']:.0f} | "
            f"{shown_ratio} | {memory} | {row['state_mib']:.1f} MiB | {mfu} |"
        )
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="a model option: tiny, smollm2, gpt2 ...")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument("--lora", default="0", help="comma-separated LoRA ranks (0: none)")
    parser.add_argument("--strategies", default="ddp",
                        help="comma-separated strategies of the N-process rows: ddp, fsdp")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--fit-samples", type=int, default=0, help="0: one batch")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="per device, for MFU")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--override", dest="overrides", action="append", default=[],
                        help="an extra dmtune override (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="the toy, 3 steps (for tests)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: results/)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.batch_size, args.max_new_tokens = "toy", 16, 4
        args.steps, args.warmup, args.fit_samples = 3, 0, 256
        args.overrides = ["experiment=toy", *args.overrides]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for lora in [int(r) for r in args.lora.split(",")]:
            for n in [int(p) for p in args.processes.split(",")]:
                for strategy in args.strategies.split(",") if n > 1 else ["ddp"]:
                    if strategy == "fsdp" and lora:
                        continue  # refused: LoRA's state is small, DDP's rows cover it
                    name = f"n{n}-r{lora}-{strategy}"
                    rows.append(run(args, n, lora, Path(tmp) / name, strategy))
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "rows": rows,
    }
    print(table(result))
    if not args.smoke or args.out:
        out = args.out or RESULTS / f"scaling_{args.model}_{args.device}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str) + "\n")
        out.with_suffix(".txt").write_text(table(result) + "\n")
    return result


if __name__ == "__main__":
    main()
