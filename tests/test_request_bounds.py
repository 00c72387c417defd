"""Bounded work in the API process: caches bounded by bytes, names by length, a program's texts together."""

from __future__ import annotations

import pytest

from service.boundedcache import BoundedCache
from service.errors import LimitExceeded
from service.expr import program
from service.expr.program import check_program
from service.limits import Limits


def test_least_recently_used_entries_go_first_by_count_and_by_bytes() -> None:
    cache = BoundedCache[str, int](max_entries=3, max_bytes=100)
    for key in "abc":
        cache.put(key, ord(key), size=10)
    assert cache.get("a") == ord("a")  # a is now the most recent
    cache.put("d", 1, size=10)  # a fourth entry: b, the least recent, goes
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "abcd" if k in cache}
    cache.put("big", 2, size=80)  # 30 + 80 > 100 bytes: the oldest go until it fits
    assert cache.bytes <= 100 and "big" in cache and len(cache) <= 3
    cache.put("huge", 3, size=101)  # larger than the whole cache: never kept
    assert "huge" not in cache and cache.bytes <= 100
    cache.put("big", 4, size=5)  # replacing an entry replaces its size
    assert cache.get("big") == 4 and cache.bytes == 5 + sum(10 for k in "acd" if k in cache)


def test_the_program_check_cache_stays_within_its_bytes() -> None:
    cache = program._CHECKED_PROGRAMS
    cache.clear()
    # 40 distinct programs of ~16,000 characters each: 640 KB of text, which a cache of 16 MiB and
    # 1,024 entries would keep whole; a smaller byte bound shows it holds.
    saved = cache.max_bytes
    cache.max_bytes = 200_000
    try:
        for i in range(40):
            check_program(" + ".join(["x"] * 4_000) + f" + {i}", ["x"], [], None, Limits())
        assert 0 < cache.bytes <= 200_000 and len(cache) < 40
    finally:
        cache.max_bytes = saved
        cache.clear()


@pytest.mark.parametrize("length", [65, 4 * 2**20])
def test_names_are_bounded_before_anything_quotes_or_keeps_them(length: int) -> None:
    name = "x" * length
    with pytest.raises(LimitExceeded) as caught:
        check_program(f"sum({'x' * 3})", [name], [], None, Limits())
    error = caught.value
    assert error.extra["limit"] == "max_name_chars" and error.extra["allowed"] == 64
    assert len(error.detail) < 200 and str(length) in error.detail
    check_program("sum(" + "x" * 64 + ")", ["x" * 64], [], None, Limits())  # at the limit: fine


def test_a_program_s_texts_are_bounded_together_before_any_is_parsed() -> None:
    # 19 functions of ~13,000 characters each (each under the per-text limit): refused as a whole,
    # before parsing (the last one is not even valid).
    body = " + ".join(["a"] * 3_250)
    functions = {f"f{i}": {"params": ["a"], "body": body} for i in range(18)}
    functions["g"] = {"params": ["a"], "body": body + " +* oops"}
    with pytest.raises(LimitExceeded) as caught:
        check_program("sum(x)", ["x"], [], functions, Limits())
    assert caught.value.extra["limit"] == "max_program_chars"
    # One function with 40 parameters and a 13,000-character gradient for each: the same.
    params = [f"p{i}" for i in range(40)]
    grads = {p: " + ".join([p] * 3_250) for p in params}
    heavy = {"f": {"params": params, "body": "p0", "gradient": grads}}
    with pytest.raises(LimitExceeded) as caught:
        check_program("sum(x)", ["x"], [], heavy, Limits())
    assert caught.value.extra["limit"] == "max_program_chars"
    # Within the total, a function's node count is checked after its body and after each gradient.
    small = Limits(max_syntax_nodes=500)
    with pytest.raises(LimitExceeded) as caught:
        check_program("sum(x)", ["x"], [], {"f": {"params": params, "body": "p0", "gradient": {
            p: " + ".join([p] * 300) for p in params}}}, small)  # fmt: skip
    assert caught.value.extra["limit"] == "max_syntax_nodes"


def test_a_gradient_is_parsed_only_as_far_as_its_function_s_remaining_node_budget() -> None:
    # Body 201 nodes, the first gradient 199: 400 of 500. The second gradient may have 100 more; it
    # stops at the 101st, before its invalid tail is read (a full tokenizer would raise ParseError).
    limits = Limits(max_syntax_nodes=500)
    spec = {
        "params": ["a", "b"],
        "body": " + ".join(["a"] * 200),
        "gradient": {"a": " + ".join(["dy"] * 198), "b": " + ".join(["dy"] * 200) + " $ $"},
    }
    with pytest.raises(LimitExceeded) as caught:
        check_program("f(x, x)", ["x"], [], {"f": spec}, limits)
    problem = caught.value.to_dict()
    assert problem["limit"] == "max_syntax_nodes" and problem["source"] == "functions.f.gradient.b"
    assert "more than 100 syntax nodes" in problem["detail"] and problem["column"] < 500
    # A shorter second gradient (the function then has 449 nodes, the expression 452) is accepted.
    spec["gradient"]["b"] = " + ".join(["dy"] * 48)  # type: ignore[index]
    check_program("f(x, x)", ["x"], [], {"f": spec}, limits)


def test_a_program_s_node_count_is_the_size_of_its_tree_with_functions_inlined() -> None:
    from service.expr import nodes as n
    from service.expr.program import build_program

    text = "sum(x[:, None] * x[None, :], axis=0, keepdims=True) + f(x)"
    built = build_program(text, ["x"], [], {"f": {"params": ["a"], "body": "mean(a, axis=0) ** 2"}})
    body = built.functions["f"].body
    assert built.node_count == n.tree_size(built.expression) + n.tree_size(body)
