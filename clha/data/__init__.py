"""Data formats of the project: raw HH-RLHF dialogues, ranked JSONL examples, tokenisation."""
