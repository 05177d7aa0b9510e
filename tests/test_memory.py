"""Peak memory of a span of work, and memory sizes as users write them."""

import mmap

import pytest

from cusprun_edge.measure.memory import format_size, measured, parse_size, rss_bytes


def _touch(n_bytes: int) -> mmap.mmap:
    """Fresh anonymous pages, every one written: resident until closed (whatever the allocator keeps)."""
    block = mmap.mmap(-1, n_bytes)
    for offset in range(0, n_bytes, mmap.PAGESIZE):
        block[offset] = 1
    return block


def test_a_span_sees_its_own_peak_not_an_earlier_one():
    _touch(400 * 2**20).close()
    start = rss_bytes()
    with measured() as span:
        _touch(100 * 2**20).close()
    assert span.scope == "stage"
    # the 100 MB raised the peak above the resident set at the start, and the 400 MB freed before did not count
    assert span.peak_bytes >= start + 90 * 2**20
    assert span.peak_bytes < start + 390 * 2**20
    assert span.seconds >= 0 and span.record()["peak_rss_mb"] == round(span.peak_bytes / 2**20, 1)


def test_an_inner_span_does_not_hide_the_outer_peak():
    with measured() as outer:
        _touch(300 * 2**20).close()
        with measured() as inner:
            _touch(50 * 2**20).close()
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
