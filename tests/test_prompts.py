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
