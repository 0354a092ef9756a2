"""What runs without downloads, outside the library's core: tiny models built from configs (`tiny`: a byte-level BPE
tokenizer trained in about a second and a tiny Llama; `tiny_reward`: tiny Llama / BERT sequence classifiers and an
OpenAssistant-style GPT-NeoX reward model) and the built-in CPU demo (`demo`, `make demo`). The tests, the demo and
the benchmarks' quick modes use them; they save ordinary Hugging Face folders, so they exercise the real code paths.
"""
