"""Section readers: each error names the key path and is worded the same everywhere."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from proxy.config.readers import Section, flag_word, type_name
from proxy.errors import ConfigError

PATH = "providers.openai.timeouts"


def error(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_type_name() -> None:
    assert [type_name(v) for v in (None, 1, "x", [1], {})] == ["null", "int", "str", "list", "dict"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        (" YES ", True),
        ("1", True),
        ("False", False),
        ("no", False),
        ("0", False),
        ("on", True),
        ("OFF", False),
        ("maybe", None),
        ("", None),
        ("2", None),
    ],
)
def test_flag_word(text: str, expected: bool | None) -> None:
    assert flag_word(text) is expected


def test_flag_word_can_refuse_on_and_off() -> None:
    assert flag_word("on", on_off=False) is None
    assert flag_word("off", on_off=False) is None
    assert flag_word("yes", on_off=False) is True


# -- the section itself --------------------------------------------------------------


def test_unknown_key_names_the_path_and_the_allowed_keys() -> None:
    msg = error(Section, {"connect": 1, "conect": 2}, PATH, ("idle", "connect", "total"))
    assert msg == f"{PATH}.conect: unknown key (allowed: connect, idle, total)"


def test_unknown_key_at_top_level_has_no_leading_dot() -> None:
    assert error(Section, {"extra": 1}, "", ("a",)) == "extra: unknown key (allowed: a)"


def test_allowed_none_accepts_any_key() -> None:
    assert len(Section({"anything": 1, "else": 2}, PATH)) == 2


def test_missing_section_is_empty_unless_required() -> None:
    s = Section(None, PATH, ("a",))
    assert len(s) == 0 and "a" not in s
    assert error(Section, None, PATH, required=True) == f"{PATH}: required section is missing"
    assert error(Section, None, "", required=True) == "(top level): required section is missing"


@pytest.mark.parametrize(("raw", "name"), [([1], "list"), ("text", "str"), (3, "int")])
def test_non_mapping_section_is_refused(raw: object, name: str) -> None:
    assert error(Section, raw, PATH) == f"{PATH}: must be a mapping, got {name}"


def test_nested_sections_extend_the_path() -> None:
    root = Section({"providers": {"openai": {"timeouts": {"bogus": 1}}}}, "")
    providers = root.section("providers")
    openai = providers.section("openai")
    msg = error(openai.section, "timeouts", ("connect",))
    assert msg == "providers.openai.timeouts.bogus: unknown key (allowed: connect)"
    assert providers.where("openai") == "providers.openai"


def test_entries_yield_named_values_and_refuse_bad_names() -> None:
    s = Section({"a": 1, "b": {"x": 2}}, "aliases")
    assert list(s.entries("alias names")) == [("a", 1), ("b", {"x": 2})]
    msg = error(lambda: list(Section({"": 1}, "aliases").entries("alias names")))
    assert msg == "aliases.'': alias names must be a non-empty string"
    msg = error(lambda: list(Section({5: 1}, "aliases").entries("alias names")))
    assert msg == "aliases.5: alias names must be a non-empty string"


def test_get_and_contains() -> None:
    s = Section({"a": 1}, PATH)
    assert "a" in s and "b" not in s
    assert s.get("a") == 1 and s.get("b", 7) == 7


# -- text / flag ---------------------------------------------------------------------


def test_text_is_stripped_and_defaults() -> None:
    s = Section({"name": "  gpt  "}, PATH)
    assert s.text("name") == "gpt"
    assert s.text("missing") == ""
    assert s.text("missing", "dflt") == "dflt"


def test_text_errors() -> None:
    s = Section({"n": 5, "blank": "  "}, PATH)
    assert error(s.text, "n") == f"{PATH}.n: must be a string, got 5"
    assert error(s.text, "missing", required=True) == f"{PATH}.missing: required"
    assert error(s.text, "blank", required=True) == f"{PATH}.blank: must not be empty"
    assert s.text("blank") == ""


def test_flag() -> None:
    s = Section({"on": True, "off": False, "yes": "yes", "one": 1}, PATH)
    assert (s.flag("on", False), s.flag("off", True), s.flag("missing", True)) == (
        True,
        False,
        True,
    )
    assert error(s.flag, "yes", False) == f"{PATH}.yes: must be true or false, got 'yes'"
    assert error(s.flag, "one", False) == f"{PATH}.one: must be true or false, got 1"


# -- number / count ------------------------------------------------------------------


def test_number_accepts_non_negative_numbers() -> None:
    s = Section({"i": 3, "f": 2.5, "z": 0}, PATH)
    assert (s.number("i"), s.number("f"), s.number("z")) == (3.0, 2.5, 0.0)
    assert isinstance(s.number("i"), float)
    assert s.number("missing", 9) == 9.0


@pytest.mark.parametrize("value", [-1, -0.5, "5", True, None, [1]])
def test_number_refuses_non_numbers_and_negatives(value: object) -> None:
    s = Section({"connect": value}, PATH)
    assert error(s.number, "connect") == (
        f"{PATH}.connect: must be a non-negative number, got {value!r}"
    )


def test_number_required_positive_and_whole() -> None:
    s = Section({"zero": 0, "half": 0.5}, PATH)
    assert error(s.number, "missing") == f"{PATH}.missing: required"
    assert error(s.number, "zero", positive=True) == (
        f"{PATH}.zero: must be a positive number, got 0"
    )
    assert error(s.number, "half", whole=True) == (
        f"{PATH}.half: must be a non-negative whole number, got 0.5"
    )
    assert s.number("zero", whole=True) == 0.0


def test_count() -> None:
    s = Section({"n": 4, "f": 4.0, "zero": 0, "frac": 1.5, "neg": -2}, PATH)
    assert (s.count("n"), s.count("f"), s.count("missing", 8)) == (4, 4, 8)
    assert isinstance(s.count("f"), int)
    assert s.count("zero", positive=False) == 0
    assert error(s.count, "zero") == f"{PATH}.zero: must be a positive whole number, got 0"
    assert error(s.count, "frac") == f"{PATH}.frac: must be a positive whole number, got 1.5"
    assert error(s.count, "neg", positive=False) == (
        f"{PATH}.neg: must be a non-negative whole number, got -2"
    )
    assert error(s.count, "missing") == f"{PATH}.missing: required"


# -- decimal -------------------------------------------------------------------------


def test_decimal_reads_what_was_written() -> None:
    s = Section({"input": 0.1, "output": 2, "big": 1e20, "exact": Decimal("0.25")}, "rules.std")
    assert s.decimal("input") == Decimal("0.1")  # not 0.1000000000000000055...
    assert s.decimal("output") == Decimal(2)
    assert s.decimal("big") == Decimal("1e+20")
    assert s.decimal("exact") == Decimal("0.25")
    assert s.decimal("missing", Decimal(3)) == Decimal(3)


@pytest.mark.parametrize("value", [True, False, "1", None, -1, -0.01, float("nan"), float("inf")])
def test_decimal_errors_name_the_key(value: object) -> None:
    s = Section({"input": value}, "price_rules.std")
    assert error(s.decimal, "input") == (
        f"price_rules.std.input: must be a non-negative number, got {value!r}"
    )


def test_decimal_required() -> None:
    assert (
        error(Section({}, "price_rules.std").decimal, "input") == "price_rules.std.input: required"
    )


# -- items_list ----------------------------------------------------------------------


def test_items_list() -> None:
    s = Section({"keys": [1, 2], "one": {"a": 1}}, "auth")
    assert s.items_list("keys") == [1, 2]
    assert s.items_list("missing") == []
    assert error(s.items_list, "one") == "auth.one: must be a list, got dict"
