"""Preprocessing on the real HH-RLHF test files (../shared/data), compared with the PRO-format reference files.

Conformance: steps 1 + 3 on the raw test files of harmless-base, helpful-base and helpful-online, with the
stored rewards of pro-format/hh_test, give the same rows (same raw lines), the same prompts and the same
chosen/rejected order as the reference files, except where the reference lost later paragraphs of a turn.

The reference split every dialogue on blank lines and kept only paragraphs that start with "Human:" or
"Assistant:" (joining consecutive paragraphs of one speaker with "\\n"). `reference_turns` below restates that
rule; the test checks that it reproduces every reference row exactly, so each difference between our output
and the reference is explained by a paragraph the rule drops, and by nothing else.

All figures asserted here are the ones measured on these files; docs/preprocessing.md reports them.
"""

from __future__ import annotations

import gzip
import json
import time
from collections import Counter
from pathlib import Path

import pytest

from clha.data.format import ASSISTANT, PROMPTER, read_ranked
from clha.data.hh_raw import split_dialogue
from clha.data.preprocess import RewardSource, step1_process, step2_train_data, step3_test_data
from clha.data.splits import PARTITIONS, PartitionConfig, normalise_prompt
from clha.fileio import read_jsonl

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RAW = SHARED / "hh-rlhf"
PRO = SHARED / "pro-format" / "hh_test"

pytestmark = pytest.mark.needs_shared_data("hh-rlhf", "pro-format/hh_test")   # an error under CI=true

COMPARED = {"harmless-base": "harmless_base", "helpful-base": "helpful_base", "helpful-online": "helpful_online"}
RAW_ROWS = {"harmless-base": 2312, "helpful-base": 2354, "helpful-online": 1137, "helpful-rejection-sampled": 2749}
PRO_ROWS = {"harmless_base": 2312, "helpful_base": 2354, "helpful_online": 1135}

# Measured: rows where our output differs from the reference (prompt or either candidate), and per part.
MISMATCH_ROWS = {"harmless_base": 185, "helpful_base": 403, "helpful_online": 503}
MISMATCH_PARTS = {  # (prompt, chosen, rejected)
    "harmless_base": (93, 48, 79),
    "helpful_base": (203, 171, 119),
    "helpful_online": (280, 245, 279),
}
# Measured step-1 counts per raw file (test split).
STEP1_COUNTS = {
    "harmless-base": dict(rows=2312, pairs=2312, dropped_turn_count_mismatch=0, kept_identical_candidates=0,
                          kept_empty_chosen=4, kept_empty_rejected=0, kept_merged_same_speaker=9),
    "helpful-base": dict(rows=2354, pairs=2354, dropped_turn_count_mismatch=0, kept_identical_candidates=2,
                         kept_empty_chosen=0, kept_empty_rejected=4, kept_merged_same_speaker=15),
    "helpful-online": dict(rows=1137, pairs=1135, dropped_turn_count_mismatch=2, kept_identical_candidates=2,
                           kept_empty_chosen=0, kept_empty_rejected=3, kept_merged_same_speaker=0),
    "helpful-rejection-sampled": dict(rows=2749, pairs=2749, dropped_turn_count_mismatch=0,
                                      kept_identical_candidates=32, kept_empty_chosen=0, kept_empty_rejected=0,
                                      kept_merged_same_speaker=3),
}
# Measured partition sizes (pairs) of the four test files with the default fractions and seed.
PARTITION_SIZES = {"policy_train": 4724, "rm_train": 1653, "dev": 436, "test": 1737}


def raw_rows(subset: str):
    with gzip.open(RAW / subset / "test.jsonl.gz", "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def reference_turns(text: str):
    """The reference (PRO step 1) splitting rule, restated: blank-line paragraphs, tagged ones only."""
    turns, role, chunks = [], None, []
    for para in text.split("\n\n"):
        if para.startswith("Human:"):
            speaker, body = PROMPTER, para[len("Human:"):]
        elif para.startswith("Assistant:"):
            speaker, body = ASSISTANT, para[len("Assistant:"):]
        else:
            continue
        if speaker != role and role is not None:
            turns.append(role + "\n".join(chunks))
            chunks = []
        role = speaker
        chunks.append(body.strip())
    if role is not None:
        turns.append(role + "\n".join(chunks))
    return turns


def lost_paragraphs(text: str):
    """Paragraphs with text that the reference rule drops."""
    return [p.strip() for p in text.split("\n\n")[1:] if p.strip() and not p.startswith(("Human:", "Assistant:"))]


@pytest.fixture(scope="module")
def test_outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("conformance")
    manifest = step1_process(RAW, out / "pre", subsets=list(COMPARED), splits=["test"])
    rewards = RewardSource.from_args(precomputed_rewards=str(PRO))
    step3_test_data(out / "pre", out / "hh_test", rewards)
    assert rewards.counts == {"precomputed": sum(PRO_ROWS.values())}  # no prompt-opening mismatch either
    mine = {stem: {r["meta"]["line_num"]: r for r in read_jsonl(out / "hh_test" / f"{stem}.json")}
            for stem in COMPARED.values()}
    return manifest, mine


def test_row_counts_match_reference_and_the_two_dropped_online_pairs(test_outputs):
    manifest, mine = test_outputs
    for subset, stem in COMPARED.items():
        pro = [r["meta"]["line_num"] for r in read_jsonl(PRO / f"{stem}.json")]
        assert len(mine[stem]) == len(pro) == PRO_ROWS[stem]
        assert set(mine[stem]) == set(pro)
        assert sorted(mine[stem]) == list(mine[stem])  # raw line order
    # helpful-online: 1137 raw rows, 1135 pairs. The two missing lines are pairs whose rejected dialogue has one
    # more turn (the human spoke again after the last assistant reply): dropped for differing turn counts.
    missing = sorted(set(range(1, RAW_ROWS["helpful-online"] + 1)) - set(mine["helpful_online"]))
    assert missing == [786, 1056]
    online = raw_rows("helpful-online")
    for line in missing:
        chosen, _ = split_dialogue(online[line - 1]["chosen"])
        rejected, _ = split_dialogue(online[line - 1]["rejected"])
        assert len(rejected) == len(chosen) + 1 and rejected[-1].startswith(PROMPTER)
        assert rejected[:-1][:len(chosen) - 1] == chosen[:-1]
    stats = manifest["raw_files"]["helpful-online/test.jsonl.gz"]
    assert stats["dropped_turn_count_mismatch"] == 2 and stats["pairs"] == 1135


def test_repeated_speaker_tags_do_not_drop_pairs():
    """Pairs kept only because consecutive same-speaker chunks form one turn (as in the reference): 5 and 9."""
    import re

    tag = re.compile(r"\n\n(?:Human|Assistant): ")
    kept = {}
    for subset in COMPARED:
        kept[subset] = sum(1 for row in raw_rows(subset)
                           if len(tag.findall(row["chosen"])) != len(tag.findall(row["rejected"]))
                           and len(split_dialogue(row["chosen"])[0]) == len(split_dialogue(row["rejected"])[0]))
    assert kept == {"harmless-base": 5, "helpful-base": 9, "helpful-online": 0}


def test_conformance_with_pro_format_test_files(test_outputs):
    _, mine = test_outputs
    report = {}
    for subset, stem in COMPARED.items():
        raw = raw_rows(subset)
        counts = Counter()
        for ref in read_jsonl(PRO / f"{stem}.json"):
            line = ref["meta"]["line_num"]
            row, pair = mine[stem][line], raw[line - 1]
            ref_chosen, ref_rejected = reference_turns(pair["chosen"]), reference_turns(pair["rejected"])
            # 1. The restated reference rule reproduces the reference row exactly (prompt, order of candidates).
            assert ref["prefix"] == [ref_chosen[:-1] + [ASSISTANT]] * 2, (stem, line)
            assert ref["suffix"] == [ref_chosen[-1][len(ASSISTANT):], ref_rejected[-1][len(ASSISTANT):]], (stem, line)
            # 2. Our row: chosen first, the full last turns, the stored rewards of that raw line.
            ours_chosen, _ = split_dialogue(pair["chosen"])
            ours_rejected, _ = split_dialogue(pair["rejected"])
            assert row["prefix"] == [ours_chosen[:-1] + [ASSISTANT]] * 2
            assert row["suffix"] == [ours_chosen[-1][len(ASSISTANT):], ours_rejected[-1][len(ASSISTANT):]]
            assert row["reward"] == ref["reward"] and row["sft_index"] == 0
            assert row["meta"]["source"] == subset and row["meta"]["split"] == "test"
            # 3. Every difference is a paragraph the reference lost, and every lost paragraph is kept by us.
            lost = lost_paragraphs(pair["chosen"]) + lost_paragraphs(pair["rejected"])
            same = (row["prefix"][0] == ref["prefix"][0], row["suffix"][0] == ref["suffix"][0],
                    row["suffix"][1] == ref["suffix"][1])
            if all(same):
                assert not lost, (stem, line)
                continue
            assert lost, (stem, line)
            text = "\n".join(row["prefix"][0] + row["suffix"])
            assert all(p in text for p in lost), (stem, line)
            counts["rows"] += 1
            counts["prompt"] += not same[0]
            counts["chosen"] += not same[1]
            counts["rejected"] += not same[2]
        report[stem] = counts
        assert counts["rows"] == MISMATCH_ROWS[stem], (stem, dict(counts))
        assert (counts["prompt"], counts["chosen"], counts["rejected"]) == MISMATCH_PARTS[stem], (stem, dict(counts))
    print("\nrows differing from the reference only by its lost paragraphs:",
          {stem: dict(c) for stem, c in report.items()})


def test_step1_counts_on_all_four_files(tmp_path):
    manifest = step1_process(RAW, tmp_path / "pre", splits=["test"])
    for subset, expected in STEP1_COUNTS.items():
        got = manifest["raw_files"][f"{subset}/test.jsonl.gz"]
        assert {k: got[k] for k in expected} == expected, subset
        assert got["dropped_history_mismatch"] == got["dropped_ends_with_human"] == got["skipped_broken"] == 0
    assert manifest["totals"]["pairs"] == 8550


def test_default_partitions_of_the_four_test_files_are_disjoint(tmp_path):
    manifest = step1_process(RAW, tmp_path / "pre", partition=PartitionConfig())
    assert manifest["partition_sizes"]["total"] == PARTITION_SIZES
    owner = {}
    for entry in manifest["files"]:
        for row in read_jsonl(tmp_path / "pre" / entry["path"]):
            key = normalise_prompt(row["prefix"][0][0][len(PROMPTER):])
            assert owner.setdefault(key, entry["split"]) == entry["split"], key
    assert set(owner.values()) == set(PARTITIONS)


@pytest.mark.slow
def test_all_three_steps_on_all_four_files(tmp_path):
    """Partitioned steps 1-3 on the four test files: stored rewards where they exist, a tiny reward model for
    helpful-rejection (no stored file). Also prints the wall time of the three steps."""
    pytest.importorskip("clha.rm.scoring")
    from test_preprocess import one_thread, save_tiny_reward_model

    model = save_tiny_reward_model(tmp_path / "rm")
    with one_thread():
        start = time.perf_counter()
        step1_process(RAW, tmp_path / "pre", partition=PartitionConfig())
        rewards = RewardSource.from_args(reward_model=str(model), precomputed_rewards=str(PRO), device="cpu",
                                         batch_size=32, max_length=128, allow_mixed=True)
        counts = step2_train_data(tmp_path / "pre", tmp_path / "hh_train_len2" / "train.json",
                                  tmp_path / "hh_dev" / "sampled_dev.json", rewards)
        test_counts = step3_test_data(tmp_path / "pre", tmp_path / "hh_test", rewards)
        elapsed = time.perf_counter() - start
    print(f"\nsteps 1-3 on the four test files: {elapsed:.1f} s; step 2 {counts}; step 3 {test_counts}; "
          f"rewards {dict(rewards.counts)}")
    assert counts["train_rows"] == PARTITION_SIZES["policy_train"] - counts["dropped_identical_candidates"]
    assert counts["dev_rows"] == 280
    assert test_counts == {"harmless_base": 476, "helpful_base": 471, "helpful_online": 241,
                           "helpful_rejection": 549}
    train = read_ranked(tmp_path / "hh_train_len2" / "train.json", expected_n=2)
    assert all(ex.reward[0] >= ex.reward[1] for ex in train)
    assert {ex.meta["partition"] for ex in train} == {"policy_train"}
    dev = read_ranked(tmp_path / "hh_dev" / "sampled_dev.json")
    assert {ex.meta["source"] for ex in dev} == set(RAW_ROWS)
