"""The value codec at the sandbox boundary: faithful for plain values, closed to everything else."""

import math

import pytest

from cqd_mpi.sandboxes.evalplus_harness import CodecError, decode_value, encode_value


def roundtrip(value):
    import json

    return decode_value(json.loads(json.dumps(encode_value(value))))


@pytest.mark.parametrize(
    "value",
    [
        None, True, 0, -7, 2**80, 1.5, "text", b"\x00\xff", 3 - 4j,
        [1, (2, 3), {4, 5}], (1, [2.0, "x"]), frozenset({1, 2}), {"a": [1], (1, 2): {3}},
        [[[]]], ((), ()), {"nested": {"deeper": (1.0, None, False)}},
    ],
)
def test_plain_values_cross_unchanged(value):
    back = roundtrip(value)
    assert back == value
    assert type(back) is type(value)


def test_special_floats_and_container_types_survive():
    back = roundtrip([math.inf, -math.inf, math.nan])
    assert back[:2] == [math.inf, -math.inf] and math.isnan(back[2])
    assert type(roundtrip((1, 2))) is tuple and type(roundtrip([1, 2])) is list


def test_subclasses_cross_as_their_honest_base_value():
    class Liar(int):
        def __eq__(self, other):
            return True

        __hash__ = int.__hash__

    class LoudStr(str):
        def __str__(self):
            return "forged"

    from collections import OrderedDict, namedtuple

    point = namedtuple("point", "x y")
    assert roundtrip(Liar(3)) == 3 and type(roundtrip(Liar(3))) is int
    assert roundtrip(LoudStr("real")) == "real"
    assert roundtrip(point(1, 2)) == (1, 2)
    assert roundtrip(OrderedDict(a=1)) == {"a": 1}


def test_numpy_scalars_become_python_scalars():
    np = pytest.importorskip("numpy")
    assert roundtrip(np.int64(5)) == 5 and type(roundtrip(np.int64(5))) is int
    assert roundtrip(np.float64(0.25)) == 0.25
    assert roundtrip(np.bool_(True)) is True


def test_other_objects_and_deep_nesting_are_refused():
    class Anything:
        def __eq__(self, other):
            return True

    with pytest.raises(CodecError, match="type Anything"):
        encode_value(Anything())
    with pytest.raises(CodecError, match="type generator"):
        encode_value(x for x in range(3))
    deep: list = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(CodecError, match="nested too deeply"):
        encode_value(deep)


def test_decoder_builds_only_known_shapes():
    for bad in ({"t": "object", "v": []}, {"t": "list"}, {"t": "dict", "v": [[1]]}, {"x": 1}, [1, 2]):
        with pytest.raises(CodecError):
            decode_value(bad)


def test_recorded_output_lines_decode_only_inside_the_judge():
    import json

    from cqd_mpi.sandboxes.evalplus_harness import recorded_output

    line = json.dumps({"event": "output", "index": 0, "value": encode_value({1: (2, 3)})})
    assert recorded_output(line) == {1: (2, 3)}
    with pytest.raises(CodecError, match="without a value"):
        recorded_output('{"event": "output", "index": 0}')
    with pytest.raises(CodecError, match="unknown value tag"):
        recorded_output('{"value": {"t": "object", "v": []}}')


# the judge's comparison rules: the pinned evalplus commit (`paper`) against evalplus 0.3.1 (`reference`)

PINNED_SOURCE = "evalplus 1895d2f6 (github:evalplus/evalplus), evalplus/eval/__init__.py"
RULES = [
    # (rule, where each side says so, entry point, atol, inputs, outputs, expected, pinned verdict)
    ("set equality for eight problems (Mbpp/2: list(set(a) & set(b)))",
     f"0.3.1 eval/_special_oracle.py:10-19, eval/__init__.py:176-177; {PINNED_SOURCE}:137,161-164",
     "similar_elements", 0, [[(3, 4, 5, 6), (5, 7, 4, 10)]], [[5, 4]], [(4, 5)], False),
    ("the Mbpp/581 oracle (a pyramid's slant height from its height)",
     f"0.3.1 eval/__init__.py:166-169, _special_oracle.py:22-31; {PINNED_SOURCE}:137,141-151",
     "surface_Area", 0, [[3, 4]], [35], [33], False),
    ("the Mbpp/558 oracle (numbers padded with zeros)",
     f"0.3.1 eval/__init__.py:170-175, _special_oracle.py:34-45; {PINNED_SOURCE}:137,141-151",
     "digit_distance_nums", 0, [[123, 5]], [5], [4], False),
    ("a bool output of a not-None problem is compared as a bool",
     f"0.3.1 eval/__init__.py:178-184; {PINNED_SOURCE}:148-151 (exp == (out is not None))",
     "check_str", 0, [["ab"]], [False], [True], True),
    ("an empty list counts as floats, so a tuple may stand for it",
     f"0.3.1 eval/__init__.py:115 (`and x`); {PINNED_SOURCE}:94-95,159-162",
     "empty_ok", 0, [[1]], [()], [[]], True),
    ("no type check before the float comparison",
     f"0.3.1 eval/__init__.py:198-201; {PINNED_SOURCE}:161-162 (assert_allclose only)",
     "floats", 0, [[1]], [(1.5, 2.5)], [[1.5, 2.5]], True),
    ("NaN equals NaN in the float comparison",
     f"0.3.1 eval/__init__.py:201 (np.allclose); {PINNED_SOURCE}:162 (assert_allclose, equal_nan)",
     "nan_ok", 0, [[1]], [float("nan")], [float("nan")], True),
]


def verdict_of_evalplus_0_3_1(entry_point, atol, inputs, outputs, expected) -> bool:
    """evalplus 0.3.1's own untrusted_check on a stand-in returning `outputs` (trusted code)."""
    import pickle

    from evalplus.eval import untrusted_check

    code = f"import pickle\n_outs = iter(pickle.loads({pickle.dumps(outputs)!r}))\n" \
           f"def {entry_point}(*args):\n    return next(_outs)\n"
    status, _ = untrusted_check("mbpp", code, inputs, entry_point, expected=expected, atol=atol,
                                ref_time=[0.0] * len(inputs), fast_check=True, min_time_limit=2.0,
                                gt_time_limit_factor=1.0)
    return status == "pass"


def verdict_pinned(entry_point, atol, outputs, expected) -> bool:
    from cqd_mpi.sandboxes.evalplus_harness import pinned_check

    for out, exp in zip(outputs, expected, strict=True):
        passed, atol = pinned_check(out, exp, entry_point, atol)
        if not passed:
            return False
    return True


@pytest.mark.parametrize("rule, source, entry_point, atol, inputs, outputs, expected, pinned", RULES,
                         ids=[r[0].split(" (")[0] for r in RULES])
def test_each_comparison_rule_where_the_pinned_commit_and_0_3_1_differ(rule, source, entry_point, atol, inputs,
                                                                         outputs, expected, pinned):
    assert verdict_pinned(entry_point, atol, outputs, expected) is pinned, f"paper: {rule} ({source})"
    assert verdict_of_evalplus_0_3_1(entry_point, atol, inputs, outputs, expected) is (not pinned), \
        f"reference: {rule} ({source})"


def test_the_rules_both_judges_share():
    """Equality; Mbpp/164 always and Mbpp/295 on 0 pass; floats within atol (1e-6 when a float is
    expected and atol is 0), and that raised atol kept for the item's later inputs."""
    assert verdict_pinned("f", 0, [[1, 2]], [[1, 2]]) and not verdict_pinned("f", 0, [[2, 1]], [[1, 2]])
    assert verdict_pinned("are_equivalent", 0, [False], [True])
    assert verdict_pinned("sum_div", 0, [0], [7]) and not verdict_pinned("sum_div", 0, [1], [7])
    assert verdict_pinned("f", 0, [1.0 + 5e-7], [1.0]) and not verdict_pinned("f", 0, [1.0 + 5e-6], [1.0])
    assert verdict_pinned("f", 1e-4, [2.00005], [2.0])
    assert verdict_pinned("f", 0, [1.0, (1, 2)], [1.0, [1, 2]]) and not verdict_pinned("f", 0, [(1, 2)], [[1, 2]])
    assert not verdict_pinned("f", 0, [[1.0]], [[1.0, 1.0]])
