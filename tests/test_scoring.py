"""caster.scoring: the metric of a language, per-utterance error counts and pooling."""

from __future__ import annotations

import math

from caster.scoring import (
    ErrorCount,
    count_errors,
    merge_counts,
    metric_of,
    pooled_counts,
    uses_cer,
)


def test_cer_languages_in_every_locale_spelling():
    for language in ("zh", "zh-CN", "zh_CN", "zh-cn", "ZH_cn", "ja-JP", "ko", "th_TH", " zh "):
        assert uses_cer(language) and metric_of(language) == "cer", language
    for language in ("de-DE", "en", "none", "zhx-CN", None):
        assert not uses_cer(language) and metric_of(language) == "wer", language


def test_count_errors_by_words_and_characters():
    assert count_errors("the cat sat", "the cat sat down", by_character=False) == ErrorCount(
        1, 3, 1
    )
    assert count_errors("a  b c", "a x", by_character=False) == ErrorCount(2, 3, 1)
    # Spaces are no characters of unspaced scripts: only 吗 is an insertion.
    assert count_errors("今天 好", "今天好吗", by_character=True) == ErrorCount(1, 3, 1)
    assert count_errors("kitten", "sitting", by_character=True) == ErrorCount(3, 6, 1)
    assert count_errors("", "a b", by_character=False) == ErrorCount(2, 0, 1)
    assert count_errors("a b", "  ", by_character=False) == ErrorCount(2, 2, 1)
    assert math.isnan(ErrorCount().rate) and ErrorCount(1, 4).rate == 0.25


def test_pooling_over_languages_and_merging_parts():
    counts = {
        (80, "en-US"): ErrorCount(1, 4, 1),
        (80, "zh_CN"): ErrorCount(2, 10, 2),
        (80, "de-DE"): ErrorCount(0, 4, 1),
        (160, "ja"): ErrorCount(1, 5, 1),
    }
    assert pooled_counts(counts) == {
        (80, "wer"): ErrorCount(1, 8, 2),
        (80, "cer"): ErrorCount(2, 10, 2),
        (160, "cer"): ErrorCount(1, 5, 1),
    }
    merged = merge_counts([counts, {(80, "en-US"): ErrorCount(3, 4, 1)}, {}])
    assert merged[80, "en-US"] == ErrorCount(4, 8, 2) and merged[160, "ja"] == counts[160, "ja"]
