"""Prompt sources (text, JSONL, datasets) and drawing a step's contexts."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from dmtune.prompts import PromptSet, load_prompts

PROMPTS = ["The cat", "A dog", "My friend"]


def test_a_text_file_gives_one_prompt_per_non_blank_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("The cat\n\nA dog\nMy friend\n")
    assert load_prompts(str(path)) == PROMPTS


def test_a_jsonl_file_gives_its_field(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"text": p, "id": i}) for i, p in enumerate(PROMPTS)))
    assert load_prompts(str(path), field="text") == PROMPTS
    with pytest.raises(ValueError, match=r"no field 'prompt' \(set train.prompt_field; keys: "):
        load_prompts(str(path))


def test_a_local_datasets_dataset_and_file_give_their_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"prompt": PROMPTS}),
        test=datasets.Dataset.from_dict({"prompt": ["Held out"]}),
    )
    splits.save_to_disk(str(tmp_path / "saved"))
    assert load_prompts(str(tmp_path / "saved")) == PROMPTS
    assert load_prompts(str(tmp_path / "saved"), split="test") == ["Held out"]
    with pytest.raises(ValueError, match="no split 'dev'.*splits: train, test"):
        load_prompts(str(tmp_path / "saved"), split="dev")
    (tmp_path / "prompts.csv").write_text("prompt,label\n" + "\n".join(f"{p},1" for p in PROMPTS))
    assert load_prompts(str(tmp_path / "prompts.csv")) == PROMPTS
    with pytest.raises(ValueError, match="no column 'text'.*columns: prompt, label"):
        load_prompts(str(tmp_path / "prompts.csv"), field="text")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "prompts file .*missing.txt' does not exist"),
        ("empty.txt", "\n\n", "no prompts found"),
        ("bad.jsonl", '{"prompt": "a"}\nnot json\n', r"bad.jsonl:2: not a JSON object"),
        ("number.jsonl", '{"prompt": 3}\n', r"number.jsonl:1: 'prompt' is a int, not a string"),
        ("nowhere/none", None, "cannot load it as a dataset"),
    ],
)
def test_unreadable_prompts_are_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        load_prompts(str(path))
    assert "\n" not in str(error.value)


def test_each_drawn_prompt_gets_exactly_samples_per_prompt_samples():
    prompts = PromptSet(tuple(PROMPTS), samples_per_prompt=4)
    generator = torch.Generator().manual_seed(0)
    seen = Counter()
    for _ in range(20):
        contexts = prompts.draw(8, generator)  # 2 of the 3 prompts per batch
        assert contexts.n_groups == 2 and len(contexts) == 8
        counts = Counter(contexts.prompts)
        assert len(counts) == 2 and set(counts.values()) == {4}  # distinct within a batch
        for group in range(2):
            in_group = {contexts.prompts[i] for i in range(8) if contexts.index[i] == group}
            assert len(in_group) == 1
        seen.update(counts)
    assert set(seen) == set(PROMPTS)  # every prompt is drawn over the steps


def test_more_groups_than_prompts_draw_with_replacement():
    contexts = PromptSet(("only",), samples_per_prompt=2).draw(6, torch.Generator())
    assert contexts.prompts == ("only",) * 6 and contexts.index.tolist() == [0, 0, 1, 1, 2, 2]


# --- through the CLI, on the toy prior ---

from typer.testing import CliRunner  # noqa: E402

from dmtune import metrics as m  # noqa: E402
from dmtune.cli import app  # noqa: E402
from dmtune.jsonl import read_jsonl  # noqa: E402

runner = CliRunner()
TOY = ["experiment=toy", "train.steps=4", "train.batch_size=16", "train.fit_samples=256",
       "device.threads=1", "logger=none", "train.eval_every=2", "train.checkpoint_every=2"]
TOY_PROMPTS = ["a", "b c", "d d"]


def _jsonl_prompts(tmp_path) -> list[str]:
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"text": p}) for p in TOY_PROMPTS) + "\n")
    return [f"train.prompts={path}", "train.prompt_field=text", "train.samples_per_prompt=4"]


def _one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (
        result.output
    )
    return lines[0]


def test_a_run_with_prompts_logs_them_and_per_context_metrics(tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", *TOY, *_jsonl_prompts(tmp_path), f"hydra.run.dir={run_dir}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    samples = read_jsonl(run_dir / "samples.jsonl")
    assert samples and {s["prompt"] for s in samples} <= set(TOY_PROMPTS)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert all(m.UNREACHED_CONTEXTS in row and m.LOG_Z in row for row in rows)
    assert any(m.EXACT_KL_TARGET_POLICY in row for row in rows)  # exact, averaged over prompts
    # the same seed resumes bit-identically, the prompt draws included
    straight = tmp_path / "straight"
    more = ["train.steps=6" if a == "train.steps=4" else a for a in TOY]
    args = [*more, *_jsonl_prompts(tmp_path)]
    assert runner.invoke(app, ["train", *args, f"hydra.run.dir={straight}"]).exit_code == 0
    assert runner.invoke(app, ["train", f"resume={run_dir}", "train.steps=6"]).exit_code == 0
    resumed = [{k: v for k, v in r.items() if not k.startswith("perf/")}
               for r in read_jsonl(run_dir / "metrics.jsonl")]
    expected = [{k: v for k, v in r.items() if not k.startswith("perf/")}
                for r in read_jsonl(straight / "metrics.jsonl")]
    assert [r[m.KL_TARGET_POLICY] for r in resumed] == [r[m.KL_TARGET_POLICY] for r in expected]


def test_a_python_scorer_receives_each_samples_prompt(tmp_path, monkeypatch):
    (tmp_path / "prompt_scoring.py").write_text(
        "def prompt_length(texts, prompts):\n"
        "    return [float(len(p)) for p in prompts]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    user = tmp_path / "conf" / "constraint"
    user.mkdir(parents=True)
    (user / "by_prompt.yaml").write_text(
        "name: by_prompt\nfeatures:\n  length:\n    kind: python\n    role: reward\n"
        "    params: {function: 'prompt_scoring:prompt_length'}\n"
    )
    run_dir = tmp_path / "run"
    result = runner.invoke(app, [
        "train", *TOY, *_jsonl_prompts(tmp_path), "constraint=by_prompt", "objective=reinforce",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"hydra.run.dir={run_dir}",
    ])
    assert result.exit_code == 0, result.output
    samples = read_jsonl(run_dir / "samples.jsonl")
    assert samples and all(s["length"] == len(s["prompt"]) for s in samples)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.samples_per_prompt=3"], "train.batch_size=16 is not a multiple of"),
        (["train.samples_per_prompt=1"], "train.samples_per_prompt=1 must be at least 2"),
        (["train.prompt_field=body"], "no field 'body'"),
        (["train.prompts=/nowhere/p.txt"], "train.prompts=/nowhere/p.txt: prompts file"),
        (["train.eval_prompts=/nowhere/e.jsonl"], "train.eval_prompts=/nowhere/e.jsonl:"),
    ],
)
def test_bad_prompt_settings_are_one_line(tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    result = runner.invoke(
        app, ["train", *TOY, *_jsonl_prompts(tmp_path), *overrides, f"hydra.run.dir={run_dir}"]
    )
    assert message in _one_error_line(result)
    assert not run_dir.exists()


def test_a_prompt_longer_than_the_context_is_one_line(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("a\n" + " ".join(["b"] * 200) + "\n")
    result = runner.invoke(app, ["train", *TOY, f"train.prompts={path}",
                                 "train.samples_per_prompt=4", f"hydra.run.dir={tmp_path / 'r'}"])
    assert "after the longest prompt" in _one_error_line(result)
