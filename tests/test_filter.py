"""The ``filter`` plugin's pattern language (SPEC section 1, "Filter:")."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from functools import cache

import pluggy
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvd import hookspecs
from kvd.errors import BadRequest
from kvd.plugins.filter import FilterPlugin, KeyPattern, compile_pattern, make_plugin


def matches(pattern: str, key: str) -> bool:
    return compile_pattern(pattern).match(key)


# --- reference model -------------------------------------------------------
# Deliberately naive and independent of the implementation: a token list and a
# memoised recursive matcher straight from the SPEC's wording.

STAR, ANY = "STAR", "ANY"


def reference_tokens(pattern: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            if i + 1 == len(pattern):
                raise ValueError("trailing backslash")
            tokens.append(("LIT", pattern[i + 1]))
            i += 2
            continue
        if char in "*$":
            tokens.append((STAR, ""))
        elif char == "?":
            tokens.append((ANY, ""))
        else:
            tokens.append(("LIT", char))
        i += 1
    return tokens


def reference_match(pattern: str, key: str) -> bool:
    tokens = reference_tokens(pattern)

    @cache
    def at(t: int, k: int) -> bool:
        if t == len(tokens):
            return k == len(key)
        kind, char = tokens[t]
        if kind == STAR:
            return at(t + 1, k) or (k < len(key) and at(t, k + 1))
        if k == len(key):
            return False
        return (kind == ANY or key[k] == char) and at(t + 1, k + 1)

    return at(0, 0)


# --- the SPEC's examples ---------------------------------------------------


@pytest.mark.parametrize("key", ["world", "wod", "word"])
def test_spec_example_dollar_matches_any_run(key: str) -> None:
    assert matches("wo$d", key)


@pytest.mark.parametrize("key", ["sword", "worlds", "wo", "Word", "wd"])
def test_spec_example_matches_whole_keys_only(key: str) -> None:
    assert not matches("wo$d", key)


def test_matching_is_case_sensitive() -> None:
    assert matches("User*", "User:1")
    assert not matches("User*", "user:1")
    assert not matches("abc", "ABC")


# --- each metacharacter ----------------------------------------------------


@pytest.mark.parametrize("star", ["*", "$"])
@pytest.mark.parametrize(
    ("key", "expected"),
    [("ab", True), ("axb", True), ("a/x y/b", True), ("a", False), ("b", False), ("abx", False)],
)
def test_star_and_dollar_match_any_run_including_none(star: str, key: str, expected: bool) -> None:
    assert matches(f"a{star}b", key) is expected


def test_lone_star_matches_every_key() -> None:
    for key in ["a", "zz", "*", "\\", "ünïcode", "x" * 1024]:
        assert matches("*", key)
        assert matches("$", key)
        assert matches("*$**", key)


def test_adjacent_stars_behave_as_one() -> None:
    assert matches("a**$*b", "ab")
    assert matches("a**$*b", "a123b")
    assert not matches("a**$*b", "a123")


@pytest.mark.parametrize(
    ("key", "expected"),
    [("ab", False), ("axb", True), ("a?b", True), ("axxb", False), ("a\\b", True)],
)
def test_question_mark_matches_exactly_one_character(key: str, expected: bool) -> None:
    assert matches("a?b", key) is expected


def test_question_marks_count_characters() -> None:
    assert matches("???", "abc")
    assert not matches("???", "ab")
    assert not matches("???", "abcd")
    assert matches("*??", "ab")
    assert not matches("*??", "a")


def test_stars_and_question_marks_combine() -> None:
    assert matches("*a?c*", "xxabcyy")
    assert matches("*a?c*", "abc")
    assert not matches("*a?c*", "xxacyy")
    assert matches("a*?*z", "a1z")
    assert not matches("a*?*z", "az")


def test_segment_is_found_after_a_false_start() -> None:
    # The first `ab` fits but leaves no room for the rest; a later one works.
    assert matches("*ab?d", "abxabcd")
    assert matches("x*aab*y", "xaaaby")
    assert not matches("x*ab*ab*y", "xaby")


def test_head_and_tail_may_not_overlap() -> None:
    assert not matches("ab*ba", "aba")
    assert matches("ab*ba", "abba")
    assert not matches("a?*?a", "aaa")
    assert matches("a?*?a", "aaaa")


# --- escapes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "literal", "not_matched"),
    [
        ("a\\*b", "a*b", "axb"),
        ("a\\?b", "a?b", "axb"),
        ("a\\$b", "a$b", "axb"),
        ("a\\\\b", "a\\b", "axb"),
    ],
)
def test_backslash_makes_a_metacharacter_literal(
    pattern: str, literal: str, not_matched: str
) -> None:
    compiled = compile_pattern(pattern)
    assert compiled.match(literal)
    assert not compiled.match(not_matched)
    assert not compiled.match("ab")
    assert compiled.prefix == literal


def test_backslash_before_an_ordinary_character_is_that_character() -> None:
    assert matches("\\a\\b", "ab")
    assert not matches("\\a\\b", "\\a\\b")


def test_escaped_star_next_to_real_star() -> None:
    assert matches("*\\**", "x*y")
    assert matches("*\\**", "*")
    assert not matches("*\\**", "xy")


@pytest.mark.parametrize("pattern", ["\\", "abc\\", "a*\\", "\\\\\\"])
def test_trailing_lone_backslash_is_a_bad_request(pattern: str) -> None:
    with pytest.raises(BadRequest) as info:
        compile_pattern(pattern)
    assert info.value.status == 400
    assert info.value.code == "bad_request"
    assert "\\" in info.value.message and "escapes nothing" in info.value.message


def test_escaped_trailing_backslash_is_fine() -> None:
    assert matches("abc\\\\", "abc\\")
    assert not matches("abc\\\\", "abc")


# --- everything else is literal --------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "key", "not_key"),
    [
        ("a.c", "a.c", "abc"),
        ("[ab]", "[ab]", "a"),
        ("(a|b)", "(a|b)", "a"),
        ("a+", "a+", "aa"),
        ("^a", "^a", "a"),
        ("a{2}", "a{2}", "aa"),
        ("%s/{}", "%s/{}", "x/y"),
    ],
)
def test_regex_metacharacters_are_literal(pattern: str, key: str, not_key: str) -> None:
    assert matches(pattern, key)
    assert not matches(pattern, not_key)


def test_regex_metacharacters_are_literal_next_to_wildcards() -> None:
    assert matches("*.json", "config.json")
    assert not matches("*.json", "configXjson")
    assert matches("[?]*", "[x]yz")
    assert not matches("[?]*", "axbyz")


def test_spaces_and_slashes_are_literal() -> None:
    assert matches("a b/*", "a b/c d")
    assert not matches("a b/*", "a_b/c")


# --- unicode ---------------------------------------------------------------


def test_unicode_keys_match_literally() -> None:
    assert matches("Grüße/*", "Grüße/München")
    assert not matches("Grüße/*", "Grusse/München")
    assert matches("日本*", "日本語")


def test_question_mark_matches_one_code_point_even_outside_the_bmp() -> None:
    assert matches("a?b", "a😀b")
    assert matches("a?b", "aéb")
    assert not matches("a?b", "a😀😀b")
    assert matches("*😀", "smile😀")


# --- the empty pattern -----------------------------------------------------


def test_empty_pattern_matches_only_the_empty_key() -> None:
    compiled = compile_pattern("")
    assert compiled.match("")
    assert compiled.prefix == ""
    # Keys are never empty, so in practice it matches nothing.
    for key in ["a", " ", "*", "\\"]:
        assert not compiled.match(key)


# --- prefix ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "prefix"),
    [
        ("user:42", "user:42"),
        ("user:*", "user:"),
        ("user:$:name", "user:"),
        ("us?r*", "us"),
        ("*user", ""),
        ("?user", ""),
        ("a\\*b*", "a*b"),
        ("a\\?b?c", "a?b"),
        ("a\\\\*", "a\\"),
        ("", ""),
    ],
)
def test_prefix_is_the_literal_head_of_the_pattern(pattern: str, prefix: str) -> None:
    assert compile_pattern(pattern).prefix == prefix


@pytest.mark.parametrize(
    ("pattern", "prefix_only"),
    [
        ("user:*", True), ("user:$", True), ("user:**$", True), ("*", True), ("a\\*b*", True),
        ("user:42", False), ("user:$:name", False), ("us?r*", False), ("*user", False),
        ("a\\*", False), ("", False),
    ],
)
def test_a_literal_head_and_one_final_star_run_is_prefix_only(pattern: str, prefix_only: bool) -> None:
    """Listings skip ``match`` for these: every key starting with the prefix matches."""
    assert compile_pattern(pattern).prefix_only is prefix_only


# --- property: implementation agrees with the reference model --------------

ALPHABET = "ab*$?\\"
patterns = st.text(alphabet=ALPHABET, max_size=12)
keys = st.text(alphabet=ALPHABET, max_size=14)


@settings(max_examples=600, deadline=None)
@given(pattern=patterns, key=keys)
@example(pattern="a*a", key="a")
@example(pattern="*a?", key="ab")
@example(pattern="\\\\*", key="\\")
def test_match_agrees_with_reference_model(pattern: str, key: str) -> None:
    try:
        expected = reference_match(pattern, key)
    except ValueError:
        with pytest.raises(BadRequest):
            compile_pattern(pattern)
        return
    compiled = compile_pattern(pattern)
    assert compiled.match(key) is expected
    if expected:
        assert key.startswith(compiled.prefix)


@settings(max_examples=300, deadline=None)
@given(pattern=patterns, data=st.data())
def test_every_matching_key_starts_with_prefix(pattern: str, data: st.DataObject) -> None:
    try:
        compiled = compile_pattern(pattern)
    except BadRequest:
        return
    # Build a key the pattern matches by filling each wildcard, then check it.
    parts: list[str] = []
    tokens = reference_tokens(pattern)
    for kind, char in tokens:
        if kind == STAR:
            parts.append(data.draw(st.text(alphabet="ab?*", max_size=3)))
        elif kind == ANY:
            parts.append(data.draw(st.sampled_from("ab?*\\")))
        else:
            parts.append(char)
    key = "".join(parts)
    assert compiled.match(key)
    assert key.startswith(compiled.prefix)


# --- hostile patterns ------------------------------------------------------

HOSTILE_SCRIPT = textwrap.dedent(
    """
    from kvd.plugins.filter import compile_pattern

    cases = [
        ("*a" * 30 + "*b", "a" * 20000, False),
        ("*a" * 30 + "*", "a" * 20000, True),
        ("$a" * 30 + "$b", "a" * 20000, False),
        ("*" + "a?" * 200 + "*b", "a" * 20000, False),
        ("*" + "a" * 500 + "b*", "a" * 20000, False),
        ("a*" * 1000 + "b", "a" * 20000, False),
        ("*?" * 500 + "*b", "x" * 20000, False),
        ("*" + "?" * 19999 + "*b", "x" * 20000, False),
    ]
    for pattern, key, expected in cases:
        assert compile_pattern(pattern).match(key) is expected, (pattern[:40], expected)
    print("ok")
    """
)


def test_hostile_patterns_finish_instead_of_backtracking() -> None:
    # A backtracking matcher takes effectively forever on these; run them in a
    # child process with a generous timeout so a regression fails, not hangs.
    result = subprocess.run(
        [sys.executable, "-c", HOSTILE_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# --- the compiled pattern --------------------------------------------------


def test_compiled_patterns_are_cached_and_immutable() -> None:
    compiled = compile_pattern("user:*")
    assert compile_pattern("user:*") is compiled
    with pytest.raises(dataclasses.FrozenInstanceError):
        compiled.prefix = ""  # type: ignore[misc]
    assert compiled.prefix == "user:"
    assert compiled.match("user:1")


def test_bad_pattern_is_rejected_every_time() -> None:
    # lru_cache does not cache exceptions; the second call must raise too.
    for _ in range(2):
        with pytest.raises(BadRequest):
            compile_pattern("oops\\")


# --- the plugin ------------------------------------------------------------


def make_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(make_plugin({}), name="filter")
    return manager


def test_hook_compile_filter_returns_key_pattern() -> None:
    manager = make_manager()
    compiled = manager.hook.compile_filter(pattern="wo$d")
    assert isinstance(compiled, KeyPattern)
    assert compiled.prefix == "wo"
    assert compiled.match("world")
    assert not compiled.match("sword")


def test_hook_compile_filter_bad_pattern_raises_bad_request() -> None:
    manager = make_manager()
    with pytest.raises(BadRequest):
        manager.hook.compile_filter(pattern="a\\")


def test_make_plugin_without_settings_returns_the_plugin() -> None:
    assert isinstance(make_plugin({}), FilterPlugin)


def test_make_plugin_rejects_any_setting() -> None:
    with pytest.raises(ValueError, match=r"unknown setting plugins\.filter\.case_insensitive"):
        make_plugin({"case_insensitive": True})


@settings(max_examples=600, deadline=None)
@given(pattern=patterns, key=keys)
def test_prefix_only_means_the_prefix_decides(pattern: str, key: str) -> None:
    try:
        compiled = compile_pattern(pattern)
    except BadRequest:
        return
    if compiled.prefix_only:
        assert compiled.match(key) is key.startswith(compiled.prefix)
