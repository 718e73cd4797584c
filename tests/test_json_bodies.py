"""Which decoded JSON documents a node refuses before any route sees them."""

from __future__ import annotations

import json

from service.api.http import MAX_JSON_DEPTH, check_json_document


def nested(levels: int) -> object:
    doc: object = 1
    for _ in range(levels):
        doc = [doc]
    return doc


def test_depth_up_to_the_limit_is_accepted_and_one_more_is_not() -> None:
    # The body object is level 1, so its value may add MAX_JSON_DEPTH - 1 levels.
    assert check_json_document({"v": nested(MAX_JSON_DEPTH - 1)}, depth=True,
                               surrogates=False) is None
    problem = check_json_document({"v": nested(MAX_JSON_DEPTH)}, depth=True, surrogates=False)
    assert problem is not None and str(MAX_JSON_DEPTH) in problem


def test_a_very_deep_document_is_refused_without_exhausting_the_stack() -> None:
    assert check_json_document(nested(100_000), depth=True, surrogates=False) is not None


def test_lone_surrogates_are_refused_in_values_and_keys_anywhere() -> None:
    for doc in ({"owner": "\ud800"}, {"v": [{"a": ["x", "\udfff"]}]}, {"v": {"\udc00": 1}}):
        problem = check_json_document(doc, depth=False, surrogates=True)
        assert problem is not None and "surrogate" in problem, doc


def test_a_surrogate_pair_is_a_character_and_accepted() -> None:
    doc = json.loads('{"owner": "\\ud83d\\ude00"}')
    assert doc == {"owner": "\U0001f600"}
    assert check_json_document(doc, depth=True, surrogates=True) is None


def test_checks_that_are_off_do_not_run() -> None:
    assert check_json_document({"owner": "\ud800"}, depth=True, surrogates=False) is None
    assert check_json_document(nested(MAX_JSON_DEPTH + 5), depth=False,
                               surrogates=True) is None
