"""Grounding boxes parsed from <ref>/<box> text."""

from internvl_core.grounding import parse_boxes


def test_ref_with_two_boxes_and_bare_box() -> None:
    text = (
        "A <ref>cat</ref><box>[[10, 20, 300, 400], [1,2,3,4]]</box> and <box>[[5, 6, 7, 8]]</box>"
    )
    assert parse_boxes(text) == [
        {"ref": "cat", "box": [10, 20, 300, 400]},
        {"ref": "cat", "box": [1, 2, 3, 4]},
        {"ref": "", "box": [5, 6, 7, 8]},
    ]


def test_no_boxes_or_malformed() -> None:
    assert parse_boxes("plain text") == []
    assert parse_boxes("<ref>x</ref><box>[[1, 2, 3]]</box>") == []
