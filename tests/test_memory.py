"""Peak memory of a span of work, and memory sizes as users write them."""

import numpy as np
import pytest

from cusprun_edge.measure.memory import format_size, measured, parse_size, rss_bytes


def test_a_span_sees_its_own_peak_not_an_earlier_one():
    big = np.ones(400 * 2**20 // 8)  # 400 MB, touched
    del big
    with measured() as span:
        small = np.ones(100 * 2**20 // 8)  # 100 MB, touched
        del small
    assert span.scope == "stage"
    before = rss_bytes()
    # the 100 MB array raised the peak above the resident set outside it, and the freed 400 MB did not count
    assert span.peak_bytes >= before + 90 * 2**20
    assert span.peak_bytes < before + 390 * 2**20
    assert span.seconds >= 0 and span.record()["peak_rss_mb"] == round(span.peak_bytes / 2**20, 1)


def test_an_inner_span_does_not_hide_the_outer_peak():
    with measured() as outer:
        big = np.ones(300 * 2**20 // 8)
        del big
        with measured() as inner:
            small = np.ones(50 * 2**20 // 8)
            del small
    assert outer.peak_bytes >= inner.peak_bytes + 200 * 2**20  # the 300 MB before the inner span began
    assert inner.peak_bytes < outer.peak_bytes


@pytest.mark.parametrize("text,expected", [("8GB", 8 * 2**30), ("8 GiB", 8 * 2**30), ("512M", 512 * 2**20),
                                           ("1.5g", int(1.5 * 2**30)), ("2048", 2048)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "0GB", "8 parsecs", "8GB8"])
def test_parse_size_refuses_what_is_no_size(text):
    with pytest.raises(ValueError, match="not a memory size"):
        parse_size(text)


def test_format_size():
    assert format_size(3 * 2**30) == "3.0 GB" and format_size(300 * 2**20) == "300 MB"
