"""HH-RLHF preprocessing: turn splitting, bad input, determinism, partitions, stored rewards, steps 1-3.

The tests here build their own small raw files; the ones on the real data (../shared/data) are in
test_preprocess_conformance.py.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clha.data.format import ASSISTANT, PROMPTER, read_ranked, render_prompt
from clha.data.hh_raw import RawStats, canonical_subset, read_raw_file, split_dialogue, subset_stem
from clha.data.precomputed import PrecomputedRewards
from clha.data.preprocess import (RewardSource, load_manifest, rerank, sample_dev, step1_process,
                                  step2_train_data, step3_test_data)
from clha.data.splits import PARTITIONS, PartitionConfig, normalise_prompt, partition_pairs
from clha.errors import InputError
from clha.fileio import read_jsonl

REPO = Path(__file__).resolve().parents[1]
STEPS = REPO / "train" / "hh_preprocess_data"


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------

def dialogue(*turns: str) -> str:
    """dialogue("H:hi", "A:hello") -> "\\n\\nHuman: hi\\n\\nAssistant: hello"."""
    out = []
    for t in turns:
        role, text = t.split(":", 1)
        out.append(("\n\nHuman: " if role == "H" else "\n\nAssistant: ") + text)
    return "".join(out)


def pair(question: str, good: str, bad: str, history=()) -> dict:
    hist = list(history)
    return {"chosen": dialogue(*hist, f"H:{question}", f"A:{good}"),
            "rejected": dialogue(*hist, f"H:{question}", f"A:{bad}")}


def write_raw(raw_dir: Path, subset: str, split: str, rows, gz: bool = False, raw_lines=None) -> Path:
    folder = raw_dir / subset
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) if raw_lines is None else "".join(raw_lines)
    if gz:
        path = folder / f"{split}.jsonl.gz"
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path = folder / f"{split}.jsonl"
        path.write_text(text, encoding="utf-8")
    return path


def small_raw_dir(root: Path) -> Path:
    """Four subsets, test split only, a few pairs each (with repeated prompts, an identical pair, multi-paragraph)."""
    raw = root / "raw"
    write_raw(raw, "harmless-base", "test", [
        pair("How do I pick a lock?", "I can't help with that.", "Use a pin."),
        pair("how do I  pick a lock?", "Please don't.", "Try a bobby pin."),
        pair("Tell me a joke", "Why did the chicken cross the road?\n\nTo get to the other side.", "No."),
    ], gz=True)
    write_raw(raw, "helpful-base", "test", [
        pair("What is the capital of France?", "Paris.", "Lyon, I think."),
        pair("Same answer?", "Yes.", "Yes."),
        pair("Follow-up?", "Sure.", "Nope.", history=["H:Hi", "A:Hello!"]),
    ])
    write_raw(raw, "helpful-online", "test", [
        pair("How do I bake bread?", "Mix flour, water, yeast.\n\nThen bake it.", "Buy it."),
        pair("HOW DO I PICK A LOCK?", "Call a locksmith.", "Hairpin."),
    ], gz=True)
    write_raw(raw, "helpful-rejection-sampled", "test", [
        pair("Name a color", "Blue.", "Seven."),
        pair("Name a fruit", "Apple.", "Chair."),
    ])
    return raw


def fake_precomputed(root: Path, raw_dir: Path) -> Path:
    """PRO-format reward files for the small raw dir: reward = [len(chosen), len(rejected)] / 10 (no rejection file)."""
    out = root / "pro"
    out.mkdir()
    for subset in ("harmless-base", "helpful-base", "helpful-online"):
        rows = read_raw_file(next((raw_dir / subset).glob("test.jsonl*")), subset, "test")
        with open(out / f"{subset_stem(subset)}.json", "w", encoding="utf-8") as handle:
            for p in reversed(rows):  # stored order is not raw order
                handle.write(json.dumps({"prefix": [p.prompt, p.prompt], "suffix": [p.chosen, p.rejected],
                                         "reward": [len(p.chosen) / 10, len(p.rejected) / 10], "sft_index": 0,
                                         "meta": {"line_num": p.line_num}}) + "\n")
    (out / "bad_test_indices.json").write_text("{}")
    return out


def files_under(path: Path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


def snapshot(path: Path):
    return {rel: (path / rel).read_bytes() for rel in files_under(path)}


# ---------------------------------------------------------------------------------------------------------------
# turn splitting
# ---------------------------------------------------------------------------------------------------------------

def test_split_simple_dialogue():
    turns, merged = split_dialogue(dialogue("H:Hi there", "A:Hello!", "H:How are you?", "A:Fine."))
    assert turns == [PROMPTER + "Hi there", ASSISTANT + "Hello!", PROMPTER + "How are you?", ASSISTANT + "Fine."]
    assert not merged


def test_multi_paragraph_reply_is_one_turn_with_all_paragraphs():
    reply = "Here are some ideas:  \n\n1.  Mexico City.\n\n2.  Guadalajara.\n\nHave fun!"
    turns, _ = split_dialogue(dialogue("H:Trip ideas?", f"A:{reply}", "H:Thanks\n\nreally", "A:You're welcome."))
    assert turns[1] == ASSISTANT + reply.strip()
    assert "2.  Guadalajara." in turns[1] and turns[1].endswith("Have fun!")
    assert turns[2] == PROMPTER + "Thanks\n\nreally"
    assert len(turns) == 4


def test_tags_without_blank_line_or_inside_text_do_not_split():
    text = "\n\nHuman: quote this:\nAssistant: not a tag\n\nAssistant: Human: is what you typed"
    turns, _ = split_dialogue(text)
    assert turns == [PROMPTER + "quote this:\nAssistant: not a tag", ASSISTANT + "Human: is what you typed"]


def test_same_speaker_chunks_merge_and_text_is_stripped():
    turns, merged = split_dialogue("\n\nHuman:  Hi  \n\nAssistant: Umm. Just a second...\n\nAssistant: Here.")
    assert merged
    assert turns == [PROMPTER + "Hi", ASSISTANT + "Umm. Just a second...\nHere."]


def test_empty_final_reply_with_or_without_trailing_space():
    for text in ("\n\nHuman: list words\n\nAssistant: ", "\n\nHuman: list words\n\nAssistant:"):
        turns, _ = split_dialogue(text)
        assert turns == [PROMPTER + "list words", ASSISTANT]


def test_render_round_trip_of_prompt():
    turns, _ = split_dialogue(dialogue("H:a\n\nb", "A:c", "H:d", "A:e"))
    prompt = turns[:-1] + [ASSISTANT]
    assert render_prompt(prompt) == "\n\nHuman: a\n\nb\n\nAssistant: c\n\nHuman: d\n\nAssistant:"


def test_pairs_counts_of_odd_and_dropped_rows(tmp_path):
    rows = [
        pair("q1", "good", "bad"),
        pair("q2", "same", "same"),                                           # kept, identical
        pair("q3", "", "bad"),                                                # kept, empty chosen
        {"chosen": dialogue("H:q4", "A:a"), "rejected": dialogue("H:q4", "A:a", "H:more?")},  # turn counts
        {"chosen": dialogue("H:q5", "A:a", "H:x"), "rejected": dialogue("H:q5", "A:b", "H:y")},  # ends with human
        {"chosen": dialogue("H:q6", "A:a"), "rejected": dialogue("H:other", "A:b")},             # history differs
        pair("q7", "line one\n\nline two", "short"),                          # kept, multi-paragraph
    ]
    path = write_raw(tmp_path, "helpful-base", "train", rows)
    stats = RawStats()
    pairs = read_raw_file(path, "helpful_base", "train", stats=stats)
    assert [p.line_num for p in pairs] == [1, 2, 3, 7]
    assert pairs[0].prompt == [PROMPTER + "q1", ASSISTANT]
    assert (pairs[0].chosen, pairs[0].rejected) == ("good", "bad")
    assert pairs[3].chosen == "line one\n\nline two"
    assert pairs[0].subset == "helpful-base" and pairs[0].split == "train"
    c = stats.as_dict()
    assert (c["rows"], c["pairs"]) == (7, 4)
    assert c["dropped_turn_count_mismatch"] == 1
    assert c["dropped_ends_with_human"] == 1
    assert c["dropped_history_mismatch"] == 1
    assert c["kept_identical_candidates"] == 1
    assert c["kept_empty_chosen"] == 1
    assert c["kept_multi_paragraph_candidate"] == 1


def test_subset_names_map_both_ways():
    assert canonical_subset("helpful_rejection") == "helpful-rejection-sampled"
    assert canonical_subset("helpful-rejection") == "helpful-rejection-sampled"
    assert canonical_subset("harmless_base") == "harmless-base"
    assert subset_stem("helpful-rejection-sampled") == "helpful_rejection"
    assert subset_stem("helpful-online") == "helpful_online"
    with pytest.raises(InputError, match="unknown HH-RLHF subset"):
        canonical_subset("red-team-attempts")


# ---------------------------------------------------------------------------------------------------------------
# bad input: InputError naming file / line / field, and no output
# ---------------------------------------------------------------------------------------------------------------

GOOD = json.dumps(pair("q", "a", "b")) + "\n"
BAD_CASES = {
    "malformed_json": ([GOOD, '{"chosen": "\\n\\nHuman: x", \n'], 2, None, "malformed JSON"),
    "missing_field": ([GOOD, GOOD, json.dumps({"chosen": dialogue("H:q", "A:a")}) + "\n"], 3, "rejected", "missing"),
    "non_string": ([json.dumps({"chosen": 5, "rejected": dialogue("H:q", "A:a")}) + "\n"], 1, "chosen",
                   "must be a string"),
    "not_an_object": ([GOOD, "[1, 2]\n"], 2, None, "expected a JSON object"),
    "no_human_turn": ([GOOD, json.dumps({"chosen": dialogue("H:q", "A:a"), "rejected": "\n\nAssistant: hi"}) + "\n"],
                      2, "rejected", "no '\\\\n\\\\nHuman: ' turn"),
    "no_assistant_turn": ([json.dumps({"chosen": "\n\nHuman: just a question", "rejected": dialogue("H:q", "A:a")})
                           + "\n"], 1, "chosen", "no '\\\\n\\\\nAssistant: ' turn"),
    "text_before_first_tag": ([json.dumps({"chosen": "preamble\n\nHuman: q\n\nAssistant: a",
                                           "rejected": dialogue("H:q", "A:a")}) + "\n"], 1, "chosen",
                              "text before the first"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_rows_raise_input_error_and_write_nothing(tmp_path, case):
    lines, line, field, message = BAD_CASES[case]
    raw = tmp_path / "raw"
    # A good subset first: its output must not be written either.
    write_raw(raw, "harmless-base", "test", [pair("fine", "a", "b")])
    path = write_raw(raw, "helpful-base", "test", None, gz=case == "malformed_json", raw_lines=lines)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=message) as info:
        step1_process(raw, out)
    err = info.value
    assert err.path == str(path)
    assert err.line == line
    assert err.field == field
    assert str(path) in str(err) and f":{line}:" in str(err)
    if field:
        assert f"field '{field}'" in str(err)
    assert files_under(out) == []


def test_skip_broken_counts_instead_of_stopping(tmp_path):
    raw = tmp_path / "raw"
    write_raw(raw, "helpful-base", "train", None, raw_lines=[
        GOOD, json.dumps({"chosen": "\n\nHuman: only a question", "rejected": dialogue("H:q", "A:a")}) + "\n", GOOD])
    manifest = step1_process(raw, tmp_path / "out", skip_broken=True)
    assert manifest["totals"]["skipped_broken"] == 1 and manifest["totals"]["pairs"] == 2


@pytest.mark.parametrize("kind", ["not_gzip", "truncated_gzip", "damaged_gzip"])
def test_unreadable_gzip_raises_input_error(tmp_path, kind):
    raw = tmp_path / "raw"
    folder = raw / "helpful-online"
    folder.mkdir(parents=True)
    path = folder / "test.jsonl.gz"
    if kind == "not_gzip":
        path.write_bytes(b"this is not gzip data\n" * 10)
    else:
        lines = [json.dumps({"chosen": dialogue(f"H:question {i}", f"A:answer {i}"),
                             "rejected": dialogue(f"H:question {i}", "A:no")}) + "\n" for i in range(400)]
        data = bytearray(gzip.compress("".join(lines).encode()))
        if kind == "truncated_gzip":
            data = data[: len(data) // 2]
        else:   # flipped bytes in the middle of the deflate stream: zlib.error while decompressing
            mid = len(data) // 2
            data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
        path.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(InputError, match="damaged or truncated gzip file" if kind != "not_gzip" else "gzip") as info:
        step1_process(raw, out)
    assert info.value.path == str(path)
    assert files_under(out) == []


def test_missing_raw_dir_and_missing_subset(tmp_path):
    with pytest.raises(InputError, match="raw data directory does not exist") as info:
        step1_process(tmp_path / "nope", tmp_path / "out")
    assert info.value.path == str(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no raw HH-RLHF files found"):
        step1_process(tmp_path / "empty", tmp_path / "out")
    raw = small_raw_dir(tmp_path)
    with pytest.raises(InputError, match="no train file for subset 'helpful-base'"):
        step1_process(raw, tmp_path / "out", subsets=["helpful-base"], splits=["train"])
    assert files_under(tmp_path / "out") == []


def test_missing_step1_output_and_reward_sources(tmp_path):
    raw = small_raw_dir(tmp_path)
    pro = fake_precomputed(tmp_path, raw)
    with pytest.raises(InputError, match="step-1 output directory does not exist"):
        step3_test_data(tmp_path / "nothing", tmp_path / "t", RewardSource.from_args(precomputed_rewards=str(pro)))
    with pytest.raises(InputError, match="no reward source"):
        RewardSource.from_args()
    with pytest.raises(InputError, match="precomputed rewards directory does not exist"):
        RewardSource.from_args(precomputed_rewards=str(tmp_path / "no_pro"))
    with pytest.raises(InputError, match="reward model path does not exist"):
        RewardSource.from_args(reward_model=str(tmp_path / "no_model"))
    with pytest.raises(InputError, match="reward model path does not exist"):
        RewardSource.from_args(reward_model="./models/rm")


def test_script_error_exit_and_default_paths_from_any_cwd(tmp_path):
    """Scripts resolve defaults from their own location; bad input is one line on stderr and exit status 2."""
    if (REPO / "data" / "raw_data" / "hhrlhf").exists():
        pytest.skip("the repository has data/raw_data/hhrlhf; the default-path error cannot be shown")
    proc = subprocess.run([sys.executable, str(STEPS / "step_1_process.py")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert f"error: {REPO / 'data' / 'raw_data' / 'hhrlhf'}: raw data directory does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# steps 1-3 on small data: format, determinism, ranking
# ---------------------------------------------------------------------------------------------------------------

def run_all(tmp_path: Path, raw: Path, pro: Path, name: str, partition=None) -> Path:
    out = tmp_path / name
    step1_process(raw, out / "pre", partition=partition)
    rewards = RewardSource.from_args(precomputed_rewards=str(pro))
    subsets = ["harmless-base", "helpful-base", "helpful-online"]
    if partition is not None:
        step2_train_data(out / "pre", out / "train.json", out / "dev.json", rewards, dev_size=3, subsets=subsets)
    step3_test_data(out / "pre", out / "test", rewards, subsets=subsets)
    return out


def test_step1_format_and_manifest(tmp_path):
    raw = small_raw_dir(tmp_path)
    manifest = step1_process(raw, tmp_path / "pre")
    assert [f["path"] for f in manifest["files"]] == [
        "harmless-base/test.json", "helpful-base/test.json", "helpful-online/test.json",
        "helpful-rejection-sampled/test.json"]
    assert all(f["role"] == "test" for f in manifest["files"])
    assert load_manifest(tmp_path / "pre") == manifest
    rows = read_jsonl(tmp_path / "pre" / "helpful-base" / "test.json")
    assert rows[2] == {
        "prefix": [[PROMPTER + "Hi", ASSISTANT + "Hello!", PROMPTER + "Follow-up?", ASSISTANT]] * 2,
        "suffix": ["Sure.", "Nope."], "reward": [0.0, 0.0], "sft_index": 0,
        "meta": {"source": "helpful-base", "split": "test", "line_num": 3, "file": "helpful-base/test.jsonl"}}
    assert manifest["totals"]["kept_identical_candidates"] == 1
    assert manifest["totals"]["kept_multi_paragraph_candidate"] == 2


def test_steps_are_deterministic_byte_for_byte(tmp_path):
    raw = small_raw_dir(tmp_path)
    pro = fake_precomputed(tmp_path, raw)
    cfg = PartitionConfig({"policy_train": 0.5, "rm_train": 0.0, "dev": 0.25, "test": 0.25}, seed=5)
    first = snapshot(run_all(tmp_path, raw, pro, "a", cfg))
    second = snapshot(run_all(tmp_path, raw, pro, "b", cfg))
    assert first == second
    assert "train.json" in first and "dev.json" in first
    plain_a = snapshot(run_all(tmp_path, raw, pro, "c"))
    plain_b = snapshot(run_all(tmp_path, raw, pro, "d"))
    assert plain_a == plain_b and "test/helpful_base.json" in plain_a
    assert not any(".tmp" in name for name in list(first) + list(plain_a))


def test_step3_keeps_human_order_and_stores_rewards(tmp_path):
    raw = small_raw_dir(tmp_path)
    pro = fake_precomputed(tmp_path, raw)
    out = run_all(tmp_path, raw, pro, "x")
    assert sorted(os.listdir(out / "test")) == ["harmless_base.json", "helpful_base.json", "helpful_online.json"]
    rows = read_ranked(out / "test" / "harmless_base.json")
    assert [r.meta["line_num"] for r in rows] == [1, 2, 3]
    joke = rows[2]
    assert joke.suffix == ["Why did the chicken cross the road?\n\nTo get to the other side.", "No."]
    assert joke.reward == [len(joke.suffix[0]) / 10, len(joke.suffix[1]) / 10]  # chosen first even if worse
    rows = read_ranked(out / "test" / "helpful_base.json")
    assert rows[0].suffix == ["Paris.", "Lyon, I think."] and rows[0].reward[0] < rows[0].reward[1]


def test_step2_reranks_best_first_drops_identical_and_samples_dev(tmp_path):
    raw = small_raw_dir(tmp_path)
    pro = fake_precomputed(tmp_path, raw)
    cfg = PartitionConfig({"policy_train": 1.0, "rm_train": 0.0, "dev": 0.0, "test": 0.0})
    step1_process(raw, tmp_path / "pre", partition=cfg)
    rewards = RewardSource.from_args(precomputed_rewards=str(pro))
    counts = step2_train_data(tmp_path / "pre", tmp_path / "train.json", None, rewards,
                              subsets=["harmless-base", "helpful-base", "helpful-online"])
    assert counts["dropped_identical_candidates"] == 1
    train = read_ranked(tmp_path / "train.json", expected_n=2)
    assert len(train) == counts["train_rows"] == 7
    for ex in train:
        assert ex.reward[0] >= ex.reward[1] and ex.sft_index == 0
        assert ex.reward == [len(ex.suffix[0]) / 10, len(ex.suffix[1]) / 10]
    paris = next(ex for ex in train if "capital of France" in ex.prefix[0][0])
    assert paris.suffix == ["Lyon, I think.", "Paris."]  # re-ranked by reward, not human order
    assert all(ex.meta["partition"] == "policy_train" for ex in train)


def test_rerank_is_stable_on_ties():
    from clha.data.format import RankedExample

    ex = RankedExample(prefix=[["p", ASSISTANT]] * 3, suffix=["a", "b", "c"], reward=[0, 0, 0])
    assert rerank(ex, [1.0, 2.0, 1.0]).suffix == ["b", "a", "c"]


def test_dev_sample_is_seeded_distinct_and_from_dev_partition(tmp_path):
    raw = small_raw_dir(tmp_path)
    pro = fake_precomputed(tmp_path, raw)
    cfg = PartitionConfig({"policy_train": 0.5, "rm_train": 0.0, "dev": 0.5, "test": 0.0}, seed=1)
    step1_process(raw, tmp_path / "pre", partition=cfg)
    rewards = RewardSource.from_args(precomputed_rewards=str(pro))
    subsets = ["harmless-base", "helpful-base", "helpful-online"]
    step2_train_data(tmp_path / "pre", tmp_path / "t1.json", tmp_path / "d1.json", rewards, dev_size=2,
                     subsets=subsets)
    dev = read_ranked(tmp_path / "d1.json")
    assert len(dev) == 2 and len({tuple(ex.prefix[0]) for ex in dev}) == 2
    assert all(ex.meta["partition"] == "dev" for ex in dev)
    # the dev sample keeps human order by default
    for ex in dev:
        raw_pair = read_raw_file(next((raw / ex.meta["source"]).glob("test.jsonl*")), ex.meta["source"],
                                 "test")[ex.meta["line_num"] - 1]
        assert ex.suffix == [raw_pair.chosen, raw_pair.rejected]
    step2_train_data(tmp_path / "pre", tmp_path / "t2.json", tmp_path / "d2.json", rewards, dev_size=2,
                     subsets=subsets)
    assert (tmp_path / "d1.json").read_bytes() == (tmp_path / "d2.json").read_bytes()
    # sample_dev itself: distinct prompts, never more than available
    assert len(sample_dev(dev + dev, 10, seed=0)) == 2


def test_step2_without_train_rows_and_precomputed_for_train_split(tmp_path):
    raw = small_raw_dir(tmp_path)
    pro = fake_precomputed(tmp_path, raw)
    step1_process(raw, tmp_path / "pre")
    rewards = RewardSource.from_args(precomputed_rewards=str(pro))
    with pytest.raises(InputError, match="no training rows"):
        step2_train_data(tmp_path / "pre", tmp_path / "train.json", None, rewards)
    # rows of a raw *train* file never pick up stored rewards of the test file with the same line number
    write_raw(raw, "helpful-base", "train", [pair("trainq", "a", "b")])
    step1_process(raw, tmp_path / "pre2", subsets=["helpful-base"])
    with pytest.raises(InputError, match="raw train line 1: the stored rewards refer to raw test files only"):
        step2_train_data(tmp_path / "pre2", tmp_path / "train.json", None, rewards)
    assert not (tmp_path / "train.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# stored rewards
# ---------------------------------------------------------------------------------------------------------------

def test_precomputed_lookup_and_missing_row(tmp_path):
    raw = small_raw_dir(tmp_path)
    pro = fake_precomputed(tmp_path, raw)
    rewards = PrecomputedRewards(pro)
    assert rewards.subsets == ["harmless-base", "helpful-base", "helpful-online"]
    assert rewards.lookup("helpful-base", 1) == [0.6, 1.4]
    assert rewards.lookup("helpful_base", 1) == [0.6, 1.4]
    with pytest.raises(InputError) as info:
        rewards.lookup("helpful-base", 99)
    assert "'helpful-base'" in str(info.value) and "raw line 99" in str(info.value)
    with pytest.raises(InputError, match="no precomputed rewards for subset 'helpful-rejection-sampled'"):
        rewards.lookup("helpful_rejection", 1)
    # a stored row without rewards
    (pro / "helpful_online.json").write_text(json.dumps({"suffix": ["a", "b"], "meta": {"line_num": 4}}) + "\n")
    with pytest.raises(InputError) as info:
        PrecomputedRewards(pro).lookup("helpful-online", 4)
    assert info.value.field == "reward" and "'helpful-online', raw line 4" in str(info.value)
    with pytest.raises(InputError, match="does not exist"):
        PrecomputedRewards(tmp_path / "missing")


def test_missing_stored_row_stops_step3_before_writing(tmp_path):
    raw = small_raw_dir(tmp_path)
    pro = fake_precomputed(tmp_path, raw)
    lines = (pro / "helpful_base.json").read_text().splitlines(keepends=True)
    (pro / "helpful_base.json").write_text("".join(line for line in lines if '"line_num": 2}' not in line))
    step1_process(raw, tmp_path / "pre")
    with pytest.raises(InputError, match="subset 'helpful-base', raw line 2"):
        step3_test_data(tmp_path / "pre", tmp_path / "t", RewardSource.from_args(precomputed_rewards=str(pro)),
                        subsets=["harmless-base", "helpful-base"])
    assert files_under(tmp_path / "t") == []


def test_stored_rewards_of_other_prompts_are_flagged(tmp_path, caplog):
    raw = small_raw_dir(tmp_path)
    pro = fake_precomputed(tmp_path, raw)
    rows = read_jsonl(pro / "helpful_base.json")
    for row in rows:
        row["prefix"] = [[PROMPTER + "Something else entirely, from another file", ASSISTANT]] * 2
    (pro / "helpful_base.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    step1_process(raw, tmp_path / "pre")
    rewards = RewardSource.from_args(precomputed_rewards=str(pro))
    with caplog.at_level("WARNING"):
        step3_test_data(tmp_path / "pre", tmp_path / "t", rewards, subsets=["helpful-base"])
    assert rewards.counts["precomputed_prompt_mismatch"] == 3
    assert "does not start like ours" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# partitions
# ---------------------------------------------------------------------------------------------------------------

def test_partitions_are_disjoint_by_prompt_and_seeded(tmp_path):
    raw = tmp_path / "raw"
    questions = [f"Question number {i % 37}?" for i in range(300)]
    for k, subset in enumerate(("harmless-base", "helpful-base")):
        rows = [pair(q.upper() if (i + k) % 2 else "  " + q.replace(" ", "   "), f"good {i}", f"bad {i}")
                for i, q in enumerate(questions)]
        write_raw(raw, subset, "test", rows)
    cfg = PartitionConfig.from_list([0.4, 0.3, 0.1, 0.2], seed=7)
    manifest = step1_process(raw, tmp_path / "pre", partition=cfg)
    owner = {}
    for entry in manifest["files"]:
        for row in read_jsonl(tmp_path / "pre" / entry["path"]):
            assert row["meta"]["partition"] == entry["split"]
            key = normalise_prompt(row["prefix"][0][0][len(PROMPTER):])
            assert owner.setdefault(key, entry["split"]) == entry["split"]
    assert len(owner) == 37
    assert sum(manifest["partition_sizes"]["total"].values()) == 600
    assert len(set(owner.values())) >= 3
    other = PartitionConfig.from_list([0.4, 0.3, 0.1, 0.2], seed=8)
    pairs = read_raw_file(raw / "helpful-base" / "test.jsonl", "helpful-base", "test")
    again = partition_pairs(pairs, cfg)
    assert {p.line_num for p in again["test"]} == {p.line_num for p in partition_pairs(pairs, cfg)["test"]}
    assert partition_pairs(pairs, other) != again


def test_partition_fractions_are_checked():
    with pytest.raises(InputError, match="sum to 1"):
        PartitionConfig.from_list([0.5, 0.5, 0.5, 0.0])
    with pytest.raises(InputError, match=">= 0"):
        PartitionConfig.from_list([1.5, -0.5, 0.0, 0.0])
    with pytest.raises(InputError, match="expected 4 fractions"):
        PartitionConfig.from_list([1.0])
    assert normalise_prompt("  How   do I\tPICK a lock? ") == "how do i pick a lock?"
    assert set(PartitionConfig().fractions) == set(PARTITIONS)


# ---------------------------------------------------------------------------------------------------------------
# a real (tiny) reward model through clha.rm.scoring
# ---------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def one_thread():
    """Torch on one thread: a tiny model gains nothing from threads, and a shared machine loses a lot."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def save_tiny_reward_model(path: Path) -> Path:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from clha.testing.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=256, num_labels=1,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    transformers.LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_reward_model_scores_rows_without_stored_rewards(tmp_path):
    """With --allow_mixed_reward_sources (without it the model scores every row: test_reward_sources.py)."""
    pytest.importorskip("clha.rm.scoring")
    model = save_tiny_reward_model(tmp_path / "rm")
    raw = small_raw_dir(tmp_path)
    pro = fake_precomputed(tmp_path, raw)
    step1_process(raw, tmp_path / "pre")
    rewards = RewardSource.from_args(reward_model=str(model), precomputed_rewards=str(pro), device="cpu",
                                     batch_size=4, max_length=64, allow_mixed=True)
    with one_thread():
        counts = step3_test_data(tmp_path / "pre", tmp_path / "t", rewards)
    assert counts["helpful_rejection"] == 2
    assert rewards.counts == {"precomputed": 8, "model": 2}
    rejection = read_ranked(tmp_path / "t" / "helpful_rejection.json")
    assert rejection[0].suffix == ["Blue.", "Seven."]
    assert all(isinstance(r, float) for ex in rejection for r in ex.reward)
    assert read_ranked(tmp_path / "t" / "helpful_base.json")[0].reward == [0.6, 1.4]
    # the same model again (alone): the same bytes
    with one_thread():
        step3_test_data(tmp_path / "pre", tmp_path / "t2", RewardSource.from_args(
            reward_model=str(model), device="cpu", batch_size=4, max_length=64), subsets=["helpful_rejection"])
    assert (tmp_path / "t" / "helpful_rejection.json").read_bytes() == \
        (tmp_path / "t2" / "helpful_rejection.json").read_bytes()
