"""Reading the model's answer (memory/extraction_answer.py): lenient about the
JSON, strict about the operations, which are accepted all or nothing."""

from __future__ import annotations

import json

import pytest

from memory.extraction_answer import parse_json_answer, validate_operations
from memory.extraction_errors import ExtractionError
from memory.models import Operation
from tests.memory.helpers import EXISTING


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("I cannot help with that.", "not valid JSON"),
        ('{"operations": [{"op": "ADD", "text": "User li', "not valid JSON"),
        ('["ADD"]', "expected a JSON object"),
        ('{"ops": []}', "operations"),
        ('{"operations": {"op": "ADD"}}', "operations"),
        ('{"operations": ["ADD"]}', "not an object"),
        ('{"operations": [{"op": "MERGE", "id": "0"}]}', "unknown op"),
        ('{"operations": [{"op": 1}]}', "unknown op"),
        ('{"operations": [{"op": "ADD"}]}', "ADD without text"),
        ('{"operations": [{"op": "ADD", "text": "   "}]}', "ADD without text"),
        ('{"operations": [{"op": "ADD", "text": 42}]}', "text must be a string"),
        ('{"operations": [{"op": "UPDATE", "id": "0"}]}', "UPDATE without text"),
        ('{"operations": [{"op": "UPDATE", "id": "7", "text": "x"}]}', "unknown id"),
        ('{"operations": [{"op": "DELETE", "id": "id-berlin"}]}', "unknown id"),
        ('{"operations": [{"op": "DELETE"}]}', "needs the id"),
        ('{"operations": [{"op": "DELETE", "id": ["0"]}]}', "needs the id"),
        (
            '{"operations": [{"op": "DELETE", "id": "0"},'
            ' {"op": "UPDATE", "id": "0", "text": "x"}]}',
            "more than one operation",
        ),
        ('{"operations": [{"op": "ADD", "text": "' + "x" * 2000 + '"}]}', "longer than"),
    ],
)
def test_untrustworthy_answers_are_rejected_whole(answer, reason):
    with pytest.raises(ExtractionError, match=reason) as caught:
        validate_operations(parse_json_answer(answer), EXISTING)
    assert caught.value.category == "invalid_answer"


def test_a_valid_op_next_to_an_invalid_one_is_not_applied_alone():
    answer = '{"operations": [{"op": "DELETE", "id": "0"}, {"op": "DELETE", "id": "9"}]}'
    with pytest.raises(ExtractionError):
        validate_operations(parse_json_answer(answer), EXISTING)


def test_small_model_quirks_that_are_unambiguous_are_accepted():
    answer = (
        'Result: {"operations": [{"op": "update", "id": 0, "text": " User lives in Rome "}]} done'
    )
    assert validate_operations(parse_json_answer(answer), EXISTING) == [
        Operation(op="UPDATE", memory_id="id-berlin", text="User lives in Rome")
    ]


def test_braces_inside_strings_do_not_confuse_the_tolerant_parser():
    answer = 'x {"operations": [{"op": "ADD", "text": "User wrote {weird} text"}]} y'
    assert validate_operations(parse_json_answer(answer), []) == [
        Operation(op="ADD", text="User wrote {weird} text")
    ]


@pytest.mark.parametrize(
    ("answer", "text"),
    [
        # llama.cpp's grammar lets raw newlines into strings.
        ('{"operations": [{"op": "ADD", "text": "User likes\njazz"}]}', "User likes\njazz"),
        ('```json\n{"operations": [{"op": "ADD", "text": "User is 34"}]}\n```', "User is 34"),
        (
            'Here you go: {"operations": [{"op": "ADD", "text": "User is 34"}]} Hope it helps!',
            "User is 34",
        ),
        ('{"operations": [{"op": "ADD", "text": "User is 34",},],}', "User is 34"),
        ('{"operations": [\n  {"op": "ADD", "text": "User is 34"},\n]\n}', "User is 34"),
        # A comma before a brace inside a string is the user's text, not a typo.
        (
            '{"operations": [{"op": "ADD", "text": "User wrote \\"a,}\\" and [b,]"},]}',
            'User wrote "a,}" and [b,]',
        ),
    ],
)
def test_json_that_small_models_get_slightly_wrong_is_read(answer, text):
    assert validate_operations(parse_json_answer(answer), []) == [Operation(op="ADD", text=text)]


def test_leniency_stops_at_the_json_the_operations_are_still_checked_strictly():
    with pytest.raises(ExtractionError, match="unknown op") as caught:
        validate_operations(parse_json_answer('{"operations": [{"op": "MERGE",},]}'), [])
    assert caught.value.category == "invalid_answer"


def test_json_dumps_of_the_answer_is_unchanged_by_the_comma_scan():
    answer = {"operations": [{"op": "ADD", "text": "a, ] b ,} c", "id": None}]}
    assert parse_json_answer(json.dumps(answer)) == answer
