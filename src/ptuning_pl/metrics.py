"""ADGEN generation metrics: ROUGE-1, ROUGE-2 and ROUGE-L on jieba words, and BLEU-4 on characters.

The scores reproduce ``compute_metrics`` in THUDM ChatGLM-6B ``ptuning/main.py``, which scores each
(prediction, reference) pair as follows:

1. Segment both strings with ``jieba.cut`` (default mode, HMM on) and join the words with spaces.
2. Score ROUGE-1, ROUGE-2 and ROUGE-L F1 on those strings with ``rouge_chinese`` 1.0.3. That package
   cuts sentences after 。！？? (and after six dots or two ellipses), collapses whitespace in each
   sentence and splits it into words. A sentence that contains only whitespace becomes one empty
   word. ROUGE-N counts each distinct n-gram once (set overlap, not clipped counts), and ROUGE-L is
   the LCS F1 over the whole word sequence. Both add 1e-8 to the F1 denominator.
3. Score BLEU-4 on characters as nltk 3.10's ``sentence_bleu([list(reference)], list(prediction),
   smoothing_function=SmoothingFunction().method3)``: clipped n-gram precision, NIST geometric
   smoothing of zero counts, and the brevity penalty.
4. Multiply each score by 100 and round it to 4 decimals. The corpus score is the plain mean over pairs.

This module reimplements steps 2 and 3, so it needs neither ``rouge_chinese`` nor nltk. The quirks
are kept. For example, a punctuation-only prediction gets the scores those rules give it, and a
one-word string scores 0 on ROUGE-2 even against itself because it has no bigram. BLEU-4 of a
string shorter than 4 characters stays below 100 against itself because of the smoothing.

One deliberate difference: the reference raises on a pair whose prediction or reference is empty or
whitespace-only. Here such a pair scores 0 on every metric and still counts in the mean and in
``count``. ``empty_predictions`` counts the pairs whose prediction is empty or whitespace-only. A
pair with a blank reference and a non-blank prediction is not counted there.

The scores assume jieba 0.42.1 and the dictionary bundled with it, which pyproject.toml pins. The
expected values in the tests were computed with that release, and a jieba release with another
dictionary would segment some strings differently. Segmentation uses a private ``jieba.Tokenizer``,
so words that other code adds to the global jieba tokenizer do not change the scores.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections import Counter
from collections.abc import Sequence
from typing import ClassVar

import jieba
import torch
from torchmetrics import Metric

__all__ = ["METRIC_NAMES", "AdgenMetric", "score_corpus", "score_pair"]

METRIC_NAMES = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")

# Each per-pair score is a multiple of 0.0001 after rounding, so sums are kept as exact integers
# in units of 0.0001 points.
_SCORE_UNITS_PER_POINT = 10_000

# The F1 formula of rouge_chinese 1.0.3 adds this to the denominator.
_ROUGE_F1_EPSILON = 1e-8

# Sentence cuts of rouge_chinese 1.0.3 (Rouge.cut_sent), applied in this order with re.sub. Each
# inserts a newline after a sentence end unless a closing quote follows it.
_SENTENCE_CUTS = (
    (re.compile(r"([。！？?])([^”’])"), r"\1\n\2"),
    (re.compile(r"(\.{6})([^”’])"), r"\1\n\2"),
    (re.compile(r"(…{2})([^”’])"), r"\1\n\2"),
    (re.compile(r"([。！？?][”’])([^，。！？?])"), r"\1\n\2"),
)

_tokenizer: jieba.Tokenizer | None = None
_tokenizer_lock = threading.Lock()


def _get_tokenizer() -> jieba.Tokenizer:
    """Return the module's jieba tokenizer, loading its dictionary on the first call.

    jieba logs the dictionary load to stderr at DEBUG level, so its logger is raised to WARNING
    for the load and restored afterwards.
    """
    global _tokenizer
    with _tokenizer_lock:
        if _tokenizer is None:
            tokenizer = jieba.Tokenizer()
            jieba_logger = jieba.default_logger
            previous_level = jieba_logger.level
            jieba_logger.setLevel(logging.WARNING)
            try:
                tokenizer.initialize()
            finally:
                jieba_logger.setLevel(previous_level)
            _tokenizer = tokenizer
        return _tokenizer


def is_blank(text: str) -> bool:
    """Return True for an empty or whitespace-only string, which the reference cannot score."""
    return not text.strip()


def rouge_words(text: str) -> list[str]:
    """Segment ``text`` with jieba and split it into the word sequence that ROUGE compares.

    This follows rouge_chinese 1.0.3 on the space-joined jieba output: cut sentences, drop empty
    ones, collapse whitespace in each, and concatenate their words. A sentence that contains only
    whitespace contributes one empty word.
    """
    spaced = " ".join(_get_tokenizer().cut(text))
    for pattern, replacement in _SENTENCE_CUTS:
        spaced = pattern.sub(replacement, spaced)

    words: list[str] = []
    for sentence in spaced.rstrip().split("\n"):
        if not sentence:
            continue
        sentence_words = sentence.split()
        words.extend(sentence_words if sentence_words else [""])
    return words


def _f1(overlap: int, hypothesis_count: int, reference_count: int) -> float:
    precision = overlap / hypothesis_count if hypothesis_count else 0.0
    recall = overlap / reference_count if reference_count else 0.0
    return 2.0 * ((precision * recall) / (precision + recall + _ROUGE_F1_EPSILON))


def _distinct_ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def rouge_n_f1(hypothesis: list[str], reference: list[str], n: int) -> float:
    """Compute ROUGE-N F1 (0 to 1) from the overlap of distinct word n-grams."""
    hypothesis_ngrams = _distinct_ngrams(hypothesis, n)
    reference_ngrams = _distinct_ngrams(reference, n)
    overlap = len(hypothesis_ngrams & reference_ngrams)
    return _f1(overlap, len(hypothesis_ngrams), len(reference_ngrams))


def _lcs_length(first: Sequence[str], second: Sequence[str]) -> int:
    """Compute the length of the longest common subsequence with a bit-parallel algorithm.

    After reading ``second[:j]``, bit i of ``row`` is 0 exactly when LCS(first[:i + 1], second[:j])
    exceeds LCS(first[:i], second[:j]), so the zero bits count the LCS. Each element of ``second``
    costs a few big-integer operations instead of a loop over ``first``.
    """
    match_masks: dict[str, int] = {}
    for position, word in enumerate(first):
        match_masks[word] = match_masks.get(word, 0) | (1 << position)

    all_ones = (1 << len(first)) - 1
    row = all_ones
    for word in second:
        matches = row & match_masks.get(word, 0)
        row = ((row + matches) | (row - matches)) & all_ones
    return len(first) - row.bit_count()


def rouge_l_f1(hypothesis: list[str], reference: list[str]) -> float:
    """Compute ROUGE-L F1 (0 to 1) from the LCS of the two word sequences.

    Both sequences must be non-empty, which ``rouge_words`` guarantees for a non-blank string.
    """
    lcs = _lcs_length(reference, hypothesis)
    recall = lcs / len(reference)
    precision = lcs / len(hypothesis)
    return 2.0 * ((precision * recall) / (precision + recall + _ROUGE_F1_EPSILON))


def _char_ngram_counts(text: str, n: int) -> Counter[str]:
    return Counter(text[i : i + n] for i in range(len(text) - n + 1))


def bleu4(prediction: str, reference: str) -> float:
    """Compute character BLEU-4 (0 to 1) as nltk 3.10's ``sentence_bleu`` with smoothing method3.

    Weights are 0.25 for n = 1..4. A precision with no matching n-gram becomes 1 / (2**k * total),
    where k counts such orders from 1 and total is the number of prediction n-grams (at least 1).
    The result is 0 when no character matches. The float operations follow nltk's order, and the
    tests compare the results with nltk 3.10.4 to within 1e-9.
    """
    log_precisions = []
    smoothing_exponent = 1
    for n in range(1, 5):
        prediction_counts = _char_ngram_counts(prediction, n)
        reference_counts = _char_ngram_counts(reference, n)
        matches = sum(min(count, reference_counts[ngram]) for ngram, count in prediction_counts.items())
        total = max(1, len(prediction) - n + 1)
        if matches == 0:
            if n == 1:
                return 0.0
            precision = 1 / (2**smoothing_exponent * total)
            smoothing_exponent += 1
        else:
            precision = matches / total
        log_precisions.append(0.25 * math.log(precision))

    if len(prediction) > len(reference):
        brevity_penalty = 1.0
    else:
        brevity_penalty = math.exp(1 - len(reference) / len(prediction))
    return brevity_penalty * math.exp(math.fsum(log_precisions))


def score_pair(prediction: str, reference: str) -> dict[str, float]:
    """Score one pair on the ADGEN metrics, each in points (0 to 100) rounded to 4 decimals.

    Returns a dict keyed by ``METRIC_NAMES``. A pair whose prediction or reference is empty or
    whitespace-only scores 0 on every metric.
    """
    if is_blank(prediction) or is_blank(reference):
        return dict.fromkeys(METRIC_NAMES, 0.0)

    hypothesis_words = rouge_words(prediction)
    reference_words = rouge_words(reference)
    fractions = {
        "rouge-1": rouge_n_f1(hypothesis_words, reference_words, 1),
        "rouge-2": rouge_n_f1(hypothesis_words, reference_words, 2),
        "rouge-l": rouge_l_f1(hypothesis_words, reference_words),
        "bleu-4": bleu4(prediction, reference),
    }
    return {name: round(value * 100, 4) for name, value in fractions.items()}


def _as_string_list(texts: str | Sequence[str], argument: str) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{argument}[{index}] must be a str, got {type(text).__name__}")
    return texts


def _sum_scores(
    predictions: str | Sequence[str], references: str | Sequence[str]
) -> tuple[dict[str, int], int, int]:
    """Score every pair and return the per-metric sums, the pair count and the blank-prediction count.

    The sums are integers in units of 0.0001 points.
    """
    predictions = _as_string_list(predictions, "predictions")
    references = _as_string_list(references, "references")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must have the same length, got {len(predictions)} "
            f"predictions and {len(references)} references"
        )

    sums = dict.fromkeys(METRIC_NAMES, 0)
    empty_predictions = 0
    for prediction, reference in zip(predictions, references):
        if is_blank(prediction):
            empty_predictions += 1
        for name, value in score_pair(prediction, reference).items():
            sums[name] += round(value * _SCORE_UNITS_PER_POINT)
    return sums, len(predictions), empty_predictions


def score_corpus(predictions: str | Sequence[str], references: str | Sequence[str]) -> dict[str, float | int]:
    """Score pairs and return the mean of each metric over all pairs, in points (0 to 100).

    The result also has ``count`` (pairs scored) and ``empty_predictions`` (pairs whose prediction is
    empty or whitespace-only). Blank pairs score 0 and count in the means. With no pairs the means
    are NaN, as the reference's ``np.mean`` of an empty list is.
    """
    sums, count, empty_predictions = _sum_scores(predictions, references)
    result: dict[str, float | int] = {}
    for name in METRIC_NAMES:
        result[name] = sums[name] / (count * _SCORE_UNITS_PER_POINT) if count else math.nan
    result["count"] = count
    result["empty_predictions"] = empty_predictions
    return result


class AdgenMetric(Metric):
    """ROUGE-1, ROUGE-2, ROUGE-L and BLEU-4 of generated text, scored as the ChatGLM-6B ADGEN example.

    ``update`` takes decoded predictions and references as strings. ``compute`` returns a dict with
    the mean of each metric in points (float64 tensors under the ``METRIC_NAMES`` keys), plus
    ``count`` and ``empty_predictions`` (int64 tensors). The states are integer sums and reduce by
    summing across processes, so the result does not depend on how pairs are split between ranks.
    See the module docstring for the scoring rules and the handling of blank strings.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    # Attribute names of the per-metric sums, in units of 0.0001 points.
    _SUM_STATES: ClassVar[dict[str, str]] = {
        "rouge-1": "rouge_1_sum",
        "rouge-2": "rouge_2_sum",
        "rouge-l": "rouge_l_sum",
        "bleu-4": "bleu_4_sum",
    }

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for state_name in self._SUM_STATES.values():
            self.add_state(state_name, default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("empty_predictions", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, predictions: str | Sequence[str], references: str | Sequence[str]) -> None:
        """Score each (prediction, reference) pair and add it to the running sums.

        Raises ValueError when the two sequences differ in length, and TypeError on a non-string item.
        """
        sums, count, empty_predictions = _sum_scores(predictions, references)
        for name, state_name in self._SUM_STATES.items():
            setattr(self, state_name, getattr(self, state_name) + sums[name])
        self.count += count
        self.empty_predictions += empty_predictions

    def compute(self) -> dict[str, torch.Tensor]:
        """Return the mean of each metric in points, ``count`` and ``empty_predictions``.

        The means are NaN before any pair has been added.
        """
        # NOTE: Apple MPS has no float64, so this raises on that device. Keep the metric on the CPU there.
        result = {}
        for name, state_name in self._SUM_STATES.items():
            score_sum = getattr(self, state_name).to(torch.float64)
            result[name] = score_sum / (self.count.to(torch.float64) * _SCORE_UNITS_PER_POINT)
        result["count"] = self.count.clone()
        result["empty_predictions"] = self.empty_predictions.clone()
        return result
