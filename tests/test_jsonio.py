"""kvd.jsonio: every number a client sends reads back with the value it had.

orjson, on the fast path, rounds decimals to doubles and reads integers beyond
64 bits as floats; these tests compare the number values of what is stored
with those of what was sent, in exact decimal arithmetic.
"""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvd import jsonio

LARGEST_DOUBLE = Decimal("1.7976931348623157e308")  # what rounds beyond it is infinite


def numbers_of(text: bytes) -> object:
    """The document with every number as an exact Decimal."""
    return json.loads(text, parse_float=Decimal, parse_int=Decimal)


digits = st.text("0123456789", min_size=1, max_size=40)
number_texts = st.builds(
    lambda sign, whole, fraction, exponent: (
        sign + (whole.lstrip("0") or "0") + (f".{fraction}" if fraction else "") + exponent
    ),
    st.sampled_from(["", "-"]),
    digits,
    st.one_of(st.just(""), digits),
    st.one_of(st.just(""), st.integers(-330, 300).map(lambda e: f"e{e}"), st.just("E+5")),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(number_texts, min_size=1, max_size=5), st.booleans())
@example(["3.14159265358979323846264338327950288"], False)
@example(["12345678901234567.89", "1e-400", "123456789012345678901234567890"], True)
@example(["0.1", "1e3", "-0.0", "5e-324"], True)
@example(["1234567890123456789012345678901234567890e300"], False)
def test_stored_numbers_have_the_values_sent(texts, in_an_object):
    body = (
        "{" + ",".join(f'"n{i}": {text}' for i, text in enumerate(texts)) + "}"
        if in_an_object else "[" + ", ".join(texts) + "]"
    ).encode()
    if any(abs(Decimal(text)) > LARGEST_DOUBLE for text in texts):
        with pytest.raises(jsonio.JSONError, match="out of range|infinity"):
            jsonio.loads(body)
        return
    stored = jsonio.dumps(jsonio.loads(body))
    assert numbers_of(stored) == numbers_of(body)
    assert jsonio.dumps(jsonio.loads(stored)) == stored  # and stay so when read again (PATCH, replay)


@pytest.mark.parametrize("text", [b"1e400", b"-1E309", b'{"a": [1e999]}'])
def test_a_number_beyond_a_doubles_range_is_refused(text):
    with pytest.raises(jsonio.JSONError, match="out of range|infinity"):
        jsonio.loads(text)


def test_the_plain_common_body_takes_the_fast_path():
    """Exactness costs the slower parser only where a number could change."""
    assert not jsonio.needs_exact_parse(b'{"id": "3f2a10e4-12e4-4a5e", "n": 12, "x": 0.5, "y": 1.5e3}')
    assert jsonio.needs_exact_parse(b'{"n": 12345678901234567}')
    assert jsonio.needs_exact_parse(b'{"n": 1.5E-400}')


@pytest.mark.parametrize("sign", ["", "-"])
def test_an_integer_of_up_to_4300_digits_reads_back_digit_for_digit_and_longer_is_refused_clearly(sign):
    longest = sign.encode() + b"7" * jsonio.MAX_INT_DIGITS
    assert jsonio.dumps(jsonio.loads(b'{"n": [' + longest + b"]}")) == b'{"n":[' + longest + b"]}"
    with pytest.raises(jsonio.JSONError) as refused:
        jsonio.loads(b'{"n": [' + longest + b"7]}")
    assert str(refused.value) == "number too long: integers are limited to 4300 digits"
