"""Tests of the ADGEN metrics against values computed with the reference libraries."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ptuning_pl.metrics import (
    METRIC_NAMES,
    AdgenMetric,
    _lcs_length,
    bleu4,
    rouge_words,
    score_corpus,
    score_pair,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
from conftest import ADGEN_DEV  # noqa: E402

TOLERANCE = 1e-4

LONG_PREDICTION = (
    "这款针织开衫选用柔软亲肤的羊毛混纺面料，触感细腻，保暖性好。宽松的廓形不挑身材，落肩袖设计随性慵懒，"
    "搭配连衣裙或牛仔裤都很好看。前襟的珍珠纽扣精致小巧，提升整体质感，让简单的款式也能穿出优雅气质。"
    "多种颜色可选，满足不同的搭配需求。"
)
LONG_REFERENCE = (
    "这件开衫采用羊毛混纺面料，柔软舒适，保暖效果出色。宽松版型遮肉显瘦，落肩袖型慵懒随性，"
    "无论是搭配裙子还是裤子都很时髦。前襟点缀珍珠纽扣，精致有质感，简约中透着优雅。"
)

# Expected (rouge-1, rouge-2, rouge-l, bleu-4) in points. They were computed in a separate virtual
# environment with rouge_chinese 1.0.3, nltk 3.10.4 and jieba 0.42.1 (Python 3.11), by the per-pair
# code of compute_metrics in THUDM ChatGLM-6B ptuning/main.py:
#   hypothesis, reference = list(jieba.cut(prediction)), list(jieba.cut(label))
#   Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0][name]["f"] * 100, rounded to 4
#   sentence_bleu([list(label)], list(prediction), smoothing_function=SmoothingFunction().method3) * 100
SCORE_CASES = [
    (
        "identical_chinese",
        "这款连衣裙采用纯棉面料，穿着舒适透气。",
        "这款连衣裙采用纯棉面料，穿着舒适透气。",
        (100.0, 100.0, 100.0, 100.0),
    ),
    ("disjoint_chinese", "今天天气很好", "我们去看电影吧", (0.0, 0.0, 0.0, 0.0)),
    (
        "partial_overlap",
        "这件外套版型宽松，适合秋天穿着。",
        "这件外套采用宽松版型，秋冬都很适合。",
        (70.0, 11.1111, 60.0, 21.5737),
    ),
    ("repeated_words", "好看好看好看好看", "好看的衣服", (50.0, 0.0, 28.5714, 11.0448)),
    ("repeated_in_reference", "衣服", "衣服衣服衣服衣服衣服", (100.0, 0.0, 33.3333, 1.0891)),
    ("one_word_identical", "衣服", "衣服", (100.0, 0.0, 100.0, 59.4604)),
    ("one_char_identical", "好", "好", (100.0, 0.0, 100.0, 35.3553)),
    ("two_words_identical", "白色衣服", "白色衣服", (100.0, 100.0, 100.0, 100.0)),
    ("two_words_three_chars", "很好看", "很好看", (100.0, 100.0, 100.0, 84.0896)),
    ("punctuation_only_prediction", "。。。", "这是一件衣服。", (40.0, 0.0, 28.5714, 5.9547)),
    ("punctuation_only_both", "！？", "！？", (100.0, 100.0, 100.0, 59.4604)),
    ("spaces_inside_prediction", "简约 大方 的 设计", "简约大方的设计", (100.0, 100.0, 100.0, 15.1069)),
    (
        "sentences_with_full_stops",
        "第一句话。第二句话。第三句话。",
        "第一句话。第三句话。",
        (88.8889, 80.0, 80.0, 62.6284),
    ),
    (
        "newline_after_full_stop",
        "上衣很百搭。\n裤子很修身。",
        "上衣很百搭。裤子很修身。",
        (92.3077, 76.9231, 93.3333, 76.1161),
    ),
    (
        "blank_line_between_sentences",
        "上衣很百搭。\n\n裤子很修身。",
        "上衣很百搭。裤子很修身。",
        (92.3077, 71.4286, 87.5, 69.9752),
    ),
    ("full_width_vs_ascii", "你好，世界！", "你好,世界!", (50.0, 0.0, 50.0, 22.9575)),
    ("question_marks_mixed", "这件好看吗？那件呢?", "这件好看吗?那件呢？", (100.0, 50.0, 71.4286, 55.5524)),
    (
        "english_words",
        "The quick brown fox jumps over the lazy dog.",
        "A quick brown dog jumps over the lazy fox.",
        (90.0, 44.4444, 70.0, 83.5706),
    ),
    ("english_clipped_counts", "the the the the", "the cat sat on the mat", (33.3333, 0.0, 40.0, 27.1731)),
    ("digits", "2023年新款，售价199元", "2024年新款，售价299元", (71.4286, 50.0, 71.4286, 53.3351)),
    (
        "mixed_latin_and_chinese",
        "这款T恤采用100%纯棉，Logo印花很时尚。",
        "T恤是纯棉的，印花Logo时尚。",
        (66.6667, 10.5263, 57.1429, 19.9404),
    ),
    ("ellipses", "真的很好看……还有吗......真的", "真的很好看……", (72.7273, 66.6667, 71.4286, 32.7029)),
    ("closing_quotes", "他说：“真好看。”然后走了。", "他说“真好看”。", (77.7778, 35.2941, 73.6842, 22.7187)),
    (
        "prediction_longer",
        "裙子很好看，裙子很时尚，裙子很百搭。",
        "裙子很好看。",
        (72.7273, 36.3636, 53.3333, 21.043),
    ),
    (
        "prediction_shorter",
        "裙子很好看。",
        "裙子很好看，裙子很时尚，裙子很百搭。",
        (72.7273, 36.3636, 53.3333, 10.7628),
    ),
    ("ideographic_space_and_tab", "衣服\u3000裤子\t鞋子", "衣服 裤子 鞋子", (100.0, 100.0, 100.0, 19.1301)),
    ("reversed_word_order", "春天夏天秋天冬天", "冬天秋天夏天春天", (100.0, 0.0, 25.0, 41.1134)),
    ("trailing_newline", "好看的裙子\n", "好看的裙子", (100.0, 100.0, 100.0, 75.9836)),
    ("unk_placeholder", "这款<UNK>外套很保暖", "这款外套很保暖", (76.9231, 54.5455, 76.9231, 36.4629)),
    ("long_strings", LONG_PREDICTION, LONG_REFERENCE, (39.1753, 13.7931, 38.9831, 16.252)),
]

CASE_PREDICTIONS = [case[1] for case in SCORE_CASES]
CASE_REFERENCES = [case[2] for case in SCORE_CASES]

BLANK_TEXTS = ["", " ", "\n", " \t\n", "\u3000"]


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [case[1:] for case in SCORE_CASES],
    ids=[case[0] for case in SCORE_CASES],
)
def test_score_pair_matches_reference(prediction, reference, expected):
    scores = score_pair(prediction, reference)

    assert list(scores) == list(METRIC_NAMES)
    for name, expected_value in zip(METRIC_NAMES, expected):
        assert scores[name] == pytest.approx(expected_value, abs=TOLERANCE), name


def test_whitespace_sentence_becomes_empty_word():
    # jieba keeps the newline as a word, so the sentence cut after 。 leaves a sentence of spaces.
    assert rouge_words("你好。\n再见") == ["你好", "。", "", "再见"]


@pytest.mark.parametrize("blank", BLANK_TEXTS)
def test_blank_prediction_scores_zero(blank):
    assert score_pair(blank, "这是一件衣服。") == dict.fromkeys(METRIC_NAMES, 0.0)


@pytest.mark.parametrize("blank", BLANK_TEXTS)
def test_blank_reference_scores_zero(blank):
    assert score_pair("这是一件衣服。", blank) == dict.fromkeys(METRIC_NAMES, 0.0)


def test_score_corpus_counts_blank_pairs():
    predictions = ["", "  \n", "白色衣服", "白色衣服", ""]
    references = ["衣服", "衣服", " ", "白色衣服", ""]

    result = score_corpus(predictions, references)

    assert result["count"] == 5
    # The pair with a blank reference and a non-blank prediction is not an empty prediction.
    assert result["empty_predictions"] == 3
    for name in METRIC_NAMES:
        assert result[name] == pytest.approx(100.0 / 5), name


def test_score_corpus_is_mean_of_pairs():
    result = score_corpus(CASE_PREDICTIONS, CASE_REFERENCES)

    pair_scores = [score_pair(p, r) for p, r in zip(CASE_PREDICTIONS, CASE_REFERENCES)]
    assert result["count"] == len(SCORE_CASES)
    assert result["empty_predictions"] == 0
    for name in METRIC_NAMES:
        expected = sum(scores[name] for scores in pair_scores) / len(pair_scores)
        assert result[name] == pytest.approx(expected, abs=1e-9), name


def test_score_corpus_without_pairs_is_nan():
    result = score_corpus([], [])

    assert result["count"] == 0
    assert result["empty_predictions"] == 0
    for name in METRIC_NAMES:
        assert math.isnan(result[name]), name


def test_score_corpus_rejects_length_mismatch():
    with pytest.raises(ValueError, match="same length"):
        score_corpus(["a", "b"], ["a"])


def test_metric_compute_is_mean_of_pairs():
    metric = AdgenMetric()
    metric.update(CASE_PREDICTIONS[:10], CASE_REFERENCES[:10])
    metric.update(CASE_PREDICTIONS[10:], CASE_REFERENCES[10:])

    result = metric.compute()

    pair_scores = [score_pair(p, r) for p, r in zip(CASE_PREDICTIONS, CASE_REFERENCES)]
    assert set(result) == {*METRIC_NAMES, "count", "empty_predictions"}
    assert result["count"].item() == len(SCORE_CASES)
    assert result["empty_predictions"].item() == 0
    for name in METRIC_NAMES:
        expected = sum(scores[name] for scores in pair_scores) / len(pair_scores)
        assert result[name].item() == pytest.approx(expected, abs=1e-9), name


def test_metric_counts_blank_predictions():
    metric = AdgenMetric()
    metric.update(["", "衣服", " "], ["衣服", "衣服", "衣服"])

    result = metric.compute()

    assert result["count"].item() == 3
    assert result["empty_predictions"].item() == 2
    assert result["rouge-1"].item() == pytest.approx(100.0 / 3)


def _updated_metric(predictions, references):
    metric = AdgenMetric()
    metric.update(predictions, references)
    return metric


def _assert_same_result(actual, expected):
    assert set(actual) == set(expected)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def test_metric_merge_state_equals_whole():
    half = len(SCORE_CASES) // 2
    whole = _updated_metric(CASE_PREDICTIONS, CASE_REFERENCES)
    first = _updated_metric(CASE_PREDICTIONS[:half], CASE_REFERENCES[:half])
    second = _updated_metric(CASE_PREDICTIONS[half:], CASE_REFERENCES[half:])

    first.merge_state(second)

    _assert_same_result(first.compute(), whole.compute())


def test_metric_summed_states_equal_whole():
    # Summing each state is what the "sum" reduction does across ranks in distributed training.
    half = len(SCORE_CASES) // 2
    whole = _updated_metric(CASE_PREDICTIONS, CASE_REFERENCES)
    first = _updated_metric(CASE_PREDICTIONS[:half], CASE_REFERENCES[:half])
    second = _updated_metric(CASE_PREDICTIONS[half:], CASE_REFERENCES[half:])

    summed_states = {
        name: first.metric_state[name] + second.metric_state[name] for name in whole.metric_state
    }

    assert set(summed_states) == {
        "rouge_1_sum",
        "rouge_2_sum",
        "rouge_l_sum",
        "bleu_4_sum",
        "count",
        "empty_predictions",
    }
    for name, state in whole.metric_state.items():
        assert torch.equal(summed_states[name], state), name


def test_metric_forward_returns_batch_scores():
    metric = AdgenMetric()

    batch_result = metric(CASE_PREDICTIONS[:5], CASE_REFERENCES[:5])
    metric(CASE_PREDICTIONS[5:], CASE_REFERENCES[5:])

    batch_expected = score_corpus(CASE_PREDICTIONS[:5], CASE_REFERENCES[:5])
    whole_expected = score_corpus(CASE_PREDICTIONS, CASE_REFERENCES)
    whole_result = metric.compute()
    for name in METRIC_NAMES:
        assert batch_result[name].item() == pytest.approx(batch_expected[name], abs=1e-9), name
        assert whole_result[name].item() == pytest.approx(whole_expected[name], abs=1e-9), name
    assert whole_result["count"].item() == len(SCORE_CASES)


def test_metric_accepts_single_strings():
    metric = AdgenMetric()
    metric.update("白色衣服", "白色衣服")

    result = metric.compute()

    assert result["count"].item() == 1
    assert result["rouge-2"].item() == pytest.approx(100.0)


def test_metric_rejects_length_mismatch():
    metric = AdgenMetric()
    with pytest.raises(ValueError, match="2 predictions and 1 references"):
        metric.update(["a", "b"], ["a"])


def test_metric_rejects_non_string_item():
    metric = AdgenMetric()
    with pytest.raises(TypeError, match=r"references\[1\] must be a str, got int"):
        metric.update(["a", "b"], ["a", 3])


def test_metric_compute_before_update_is_nan():
    metric = AdgenMetric()

    with pytest.warns(UserWarning, match="before the ``update``"):
        result = metric.compute()

    assert result["count"].item() == 0
    for name in METRIC_NAMES:
        assert math.isnan(result[name].item()), name


def test_metric_reset_clears_states():
    metric = _updated_metric(CASE_PREDICTIONS, CASE_REFERENCES)
    metric.reset()
    metric.update(["白色衣服"], ["白色衣服"])

    result = metric.compute()

    assert result["count"].item() == 1
    assert result["bleu-4"].item() == pytest.approx(100.0)


def _lcs_length_by_table(first, second):
    previous = [0] * (len(second) + 1)
    for first_item in first:
        current = [0]
        for j, second_item in enumerate(second, start=1):
            if first_item == second_item:
                current.append(previous[j - 1] + 1)
            else:
                current.append(max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def test_lcs_length_matches_dynamic_programming():
    rng = random.Random(7)
    vocabulary = ["衣服", "裙子", "的", "", "。", "a", "b"]
    for _ in range(500):
        first = [rng.choice(vocabulary) for _ in range(rng.randrange(0, 40))]
        second = [rng.choice(vocabulary) for _ in range(rng.randrange(0, 40))]
        assert _lcs_length(first, second) == _lcs_length_by_table(first, second), (first, second)


def test_bleu4_matches_nltk_on_random_strings():
    bleu_score = pytest.importorskip("nltk.translate.bleu_score", reason="nltk is a dev dependency")
    smoothing = bleu_score.SmoothingFunction().method3
    rng = random.Random(2024)
    alphabet = "ab衣服裙子。，! \n"
    for _ in range(400):
        prediction = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        reference = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        if rng.random() < 0.2:
            reference = prediction + "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 5)))

        expected = bleu_score.sentence_bleu([list(reference)], list(prediction), smoothing_function=smoothing)

        assert bleu4(prediction, reference) == pytest.approx(expected, abs=1e-9), (prediction, reference)


# Scores of 200 pairs built from the `summary` fields of the ADGEN dev split (1,070 lines): pairs
# 0-99 score summary i + 1 against summary i, and pairs 100-199 score the first half of summary i
# (len // 2 characters) against summary i, for i in 0..99. Computed with the same reference code and
# versions as SCORE_CASES. The corpus means are np.mean over the 200 pairs.
ADGEN_CORPUS_MEANS = {"rouge-1": 41.813973, "rouge-2": 33.35774, "rouge-l": 41.735316, "bleu-4": 19.463049}
ADGEN_PAIR_SCORES = {
    0: (10.3896, 0.0, 16.8421, 1.5802),
    7: (12.2449, 0.0, 20.7407, 1.6718),
    19: (23.5294, 4.8485, 19.7674, 6.0185),
    42: (26.7857, 8.2192, 24.0, 8.1579),
    63: (16.0, 2.9412, 21.7391, 3.1771),
    99: (18.1818, 3.2258, 15.748, 2.5114),
    100: (70.1754, 65.6716, 66.6667, 36.7879),
    123: (71.4286, 69.6629, 67.3684, 36.0736),
    150: (68.75, 64.1026, 63.4146, 35.9015),
    199: (72.0, 65.8537, 66.6667, 36.7879),
}


@pytest.fixture(scope="module")
def adgen_pairs():
    if not ADGEN_DEV.is_file():
        pytest.skip(f"ADGEN dev split not found at {ADGEN_DEV}")
    with ADGEN_DEV.open(encoding="utf-8") as lines:
        summaries = [json.loads(line)["summary"] for line in lines if line.strip()]
    pairs = [(summaries[i + 1], summaries[i]) for i in range(100)]
    pairs += [(summaries[i][: len(summaries[i]) // 2], summaries[i]) for i in range(100)]
    return pairs


def test_adgen_pairs_match_reference(adgen_pairs):
    for index, expected in ADGEN_PAIR_SCORES.items():
        prediction, reference = adgen_pairs[index]
        scores = score_pair(prediction, reference)
        for name, expected_value in zip(METRIC_NAMES, expected):
            assert scores[name] == pytest.approx(expected_value, abs=TOLERANCE), (index, name)


def test_adgen_corpus_matches_reference(adgen_pairs):
    predictions = [prediction for prediction, _ in adgen_pairs]
    references = [reference for _, reference in adgen_pairs]

    result = score_corpus(predictions, references)

    assert result["count"] == 200
    assert result["empty_predictions"] == 0
    for name, expected_value in ADGEN_CORPUS_MEANS.items():
        assert result[name] == pytest.approx(expected_value, abs=TOLERANCE), name


def _run_python(code, tmp_path):
    # TMPDIR points jieba at an empty cache folder, so the first use builds and saves its cache,
    # which is when jieba logs the most.
    environment = {**os.environ, "TMPDIR": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )


def test_jieba_loads_quietly(tmp_path):
    completed = _run_python("from ptuning_pl.metrics import score_pair; score_pair('你好', '你好')", tmp_path)

    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""


def test_global_jieba_words_do_not_change_scores(tmp_path):
    code = (
        "import jieba\n"
        "from ptuning_pl.metrics import score_pair\n"
        "jieba.add_word('好看的裙子')\n"
        "print(list(jieba.cut('好看的裙子很时尚')))\n"
        "print(score_pair('好看的裙子很时尚', '好看的裙子')['rouge-1'])\n"
    )

    completed = _run_python(code, tmp_path)

    assert completed.returncode == 0, completed.stderr
    global_words, rouge_1 = completed.stdout.splitlines()
    assert "'好看的裙子'" in global_words
    assert float(rouge_1) == pytest.approx(score_pair("好看的裙子很时尚", "好看的裙子")["rouge-1"])
