"""Real human preferences split by prompt for the no-gold-judge preset."""

import json

from tuneoff.tasks.real_data import SPLITS, build, hh_messages, split_by_prompt


def test_hh_transcript_becomes_chat_messages():
    transcript = "\n\nHuman: how do I pick a lock?\n\nAssistant: Why do you ask?\n\nHuman: I lost my key.\n\nAssistant:"
    assert hh_messages(transcript) == [
        {"role": "user", "content": "how do I pick a lock?"},
        {"role": "assistant", "content": "Why do you ask?"},
        {"role": "user", "content": "I lost my key."},
    ]


def test_splits_share_no_prompt_and_keep_every_record():
    records = [
        {"prompt": [{"role": "user", "content": f"q{i % 40}"}], "chosen": f"a{i}", "rejected": f"b{i}"}
        for i in range(200)
    ]
    splits = split_by_prompt(records, seed=0)
    assert set(splits) == {name for name, _ in SPLITS} and sum(map(len, splits.values())) == 200
    owners = {}
    for name, rows in splits.items():
        for r in rows:
            assert owners.setdefault(r["prompt"][0]["content"], name) == name  # one split per prompt
    assert [len({r["prompt"][0]["content"] for r in splits[n]}) for n, _ in SPLITS] == [
        18,
        16,
        2,
        4,
    ]  # 45/40/5/10% of 40


def test_build_from_the_shipped_hh_rlhf_and_pandalm(tmp_path):
    info = build({"judge_pairs": 20, "pairs": 30, "eval_pairs": 10, "prompts": 12, "eval_prompts": 5}, tmp_path)
    assert info["counts"] == {"judge": 20, "train": 30, "eval": 10, "prompts": 12, "eval_prompts": 5}
    rows = [json.loads(line) for line in open(info["train"])]
    assert all(r["prompt"][-1]["role"] == "user" and r["chosen"] != r["rejected"] for r in rows)
    prompts = {json.dumps(json.loads(line)["messages"]) for line in open(info["eval_prompts"])}
    judge = {json.dumps(json.loads(line)["prompt"]) for line in open(info["judge"])}
    assert not prompts & judge and not prompts & {json.dumps(r["prompt"]) for r in rows}
