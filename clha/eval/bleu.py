"""BLEU as the reference protocol computed it, without nltk: `sentence_bleu` equals nltk 3.x's
`sentence_bleu([reference], hypothesis)` (the tests compare against nltk); `char_bleu` is the reference's
(over characters), `word_bleu` the same over word/punctuation tokens. `sigmoid` turns reward logits into rewards."""

from __future__ import annotations

import math
import re
import sys
from collections import Counter
from typing import List, Sequence

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def _ngram_counts(tokens: Sequence, n: int) -> Counter:
    if len(tokens) < n:
        return Counter()
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu(reference: Sequence, hypothesis: Sequence, max_n: int = 4) -> float:
    """BLEU of one hypothesis against one reference, equal to nltk 3.x `sentence_bleu([reference], hypothesis)`.

    nltk defaults: uniform weights over 1..4-grams, clipped n-gram precisions, brevity penalty exp(1 - r/c), no
    smoothing. As in nltk: no matching unigram -> 0; a higher order with no match contributes log of the
    smallest positive float, so the score is ~1e-78 (0 in any printed table, and nltk warns).
    """
    hyp_len, ref_len = len(hypothesis), len(reference)
    numerators, denominators = [], []
    for n in range(1, max_n + 1):
        hyp_counts = _ngram_counts(hypothesis, n)
        ref_counts = _ngram_counts(reference, n)
        numerators.append(sum(min(count, ref_counts[g]) for g, count in hyp_counts.items()))
        denominators.append(max(1, sum(hyp_counts.values())))
    if numerators[0] == 0:
        return 0.0
    if hyp_len > ref_len:
        bp = 1.0
    else:   # hyp_len > 0 here, since there is a matching unigram
        bp = math.exp(1 - ref_len / hyp_len)
    weight = 1.0 / max_n
    logs = [weight * math.log(num / den if num else sys.float_info.min)
            for num, den in zip(numerators, denominators)]
    return bp * math.exp(math.fsum(logs))


def word_tokens(text: str) -> List[str]:
    """Words and single punctuation marks: "Hi, you!" -> ["Hi", ",", "you", "!"]."""
    return _WORD.findall(text)


def char_bleu(response: str, reference: str) -> float:
    """The reference protocol's BLEU: nltk over the characters of the stripped strings."""
    return sentence_bleu(list(reference.strip()), list(response.strip()))


def word_bleu(response: str, reference: str) -> float:
    return sentence_bleu(word_tokens(reference), word_tokens(response))


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)
