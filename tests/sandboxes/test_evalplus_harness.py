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
