"""The object task's text protocol: region references, the question catalogue, answer parsing
(units, number words, yes / no wordings, choices) and answer formatting."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm3_ros import protocol as p

# The public VLM3 sample (facebookresearch/VLM3 sample_data/spatialrgpt_labels.json).
SAMPLE_QUESTION = ("Can you confirm if bounding box region (0, 39, 652, 999) is smaller than bounding box region "
                   "(6, 380, 228, 562)?")
SAMPLE_ANSWER = ("Incorrect, bounding box region (0, 39, 652, 999) is not smaller in size than bounding box region "
                 "(6, 380, 228, 562).")
A, B = "bounding box region (0, 39, 652, 999)", "bounding box region (6, 380, 228, 562)"


def test_sample_question_and_answer_are_reproduced_byte_for_byte():
    assert p.object_question("small_predicate", [A, B]) == SAMPLE_QUESTION
    assert p.format_object_answer("small_predicate", False, [A, B]) == SAMPLE_ANSWER
    assert p.parse_object_question(SAMPLE_QUESTION) == ("small_predicate", [(0, 39, 652, 999), (6, 380, 228, 562)])
    assert p.parse_object_answer("small_predicate", SAMPLE_ANSWER) is False


def test_sample_regions_normalise_from_the_unrounded_boxes():
    # 1024x768 image (fx 902.47) resized to 1134x851 for f = 1000. The sample's normalised regions
    # follow from boxes at the original resolution ([0, 30, 668, 767] and [6, 292, 233, 432]:
    # 432 / 768 * 1000 = 562.5 rounds half to even).
    for box, ref in (((0, 30, 668, 767), A), ((6, 292, 233, 432), B)):
        assert p.bbox_reference(box, 1024, 768) == ref
    # Scaled exactly (no rounding to pixels), the first box normalises the same in the resized image
    # (the second's 562.5 is an exact tie that floating point may tip either way once scaled).
    sx, sy = 1134 / 1024, 851 / 768
    assert p.bbox_reference((0, 30 * sy, 668 * sx, 767 * sy), 1134, 851) == A
    # The sample's resized pixel boxes are themselves rounded: they land within one unit.
    got = p.parse_bbox_references(p.bbox_reference((0, 33, 740, 850), 1134, 851))[0]
    assert max(abs(a - b) for a, b in zip(got, (0, 39, 652, 999))) == 1


def test_catalogue_templates_and_training_answers_are_consistent():
    for qid, q in p.OBJECT_QUESTIONS.items():
        regions = [A, B][: q.regions]
        text = p.object_question(qid, regions)
        assert p.parse_object_question(text) == (qid, [tuple(float(v) for v in r) for r in
                                                       ((0, 39, 652, 999), (6, 380, 228, 562))[: q.regions]])
        values = {"quantity": [0.0, 1.25, 7.5], "predicate": [True, False], "choice": [0, 1]}[q.kind]
        for value in values:
            answer = p.format_object_answer(qid, value, regions)
            assert p.parse_object_answer(qid, answer, [(0, 39, 652, 999), (6, 380, 228, 562)]) == value, answer
    assert p.object_question_id("width") == "width_data" and p.object_question_id("left_choice") == "left_choice"
    with pytest.raises(p.ProtocolError, match="unknown object question"):
        p.object_question_id("colour")
    with pytest.raises(p.ProtocolError, match="takes 2 region"):
        p.object_question("left_predicate", [A])
    with pytest.raises(p.ProtocolError, match="not an object question"):
        p.parse_object_question("What is the colour of bounding box region (1, 2, 3, 4)?")
    with pytest.raises(p.ProtocolError, match="not an object question"):
        p.parse_object_question("What is the width of bounding box region (1, 2, 3, 4) and bounding box region (1, 2, 3, 4)?")


def test_the_object_spec_round_trips_through_a_protocol_file(tmp_path):
    p.save_protocol(tmp_path, [p.OBJECT, p.DEPTH])
    loaded = p.load_protocol(tmp_path)["object"]
    assert loaded == p.OBJECT
    assert p.object_question("tall_predicate", [A, B], loaded) == p.object_question("tall_predicate", [A, B])


@pytest.mark.parametrize("text, metres", [
    ("1.25 meters", 1.25),
    ("The width of bounding box region (0, 39, 652, 999) is 6.91 feet.", 6.91 * 0.3048),
    ("bounding box region (0, 39, 652, 999) is 35.5 centimeters wide.", 0.355),
    ("It is 350 mm.", 0.35),
    ("About 1.2m.", 1.2),
    ("2 metres", 2.0),
    ("0.004 km", 4.0),
    ("It is approximately 27.56 inches.", 27.56 * 0.0254),
    ("12 in.", 12 * 0.0254),
    ("3 ft", 3 * 0.3048),
    ("5 feet 3 inches", 5 * 0.3048 + 3 * 0.0254),
    ("5'3\"", 5 * 0.3048 + 3 * 0.0254),
    ("one and a half meters", 1.5),
    ("one and a half feet", 1.5 * 0.3048),
    ("a meter and a half", 1.5),
    ("half a meter", 0.5),
    ("three quarters of a meter", 0.75),
    ("a foot", 0.3048),
    ("twenty-five centimeters", 0.25),
    ("two hundred and fifty millimeters", 0.25),
    ("one point five meters", 1.5),
    ("2 and a half feet", 2.5 * 0.3048),
    ("<think> about a meter </think><answer> 1.1 meters </answer>", 1.1),
    ("1.2 meters (3.94 feet)", 1.2),  # the same length twice, in two units
    ("They are 0 meters apart.", 0.0),
])
def test_quantities_in_any_unit_and_wording_become_metres(text, metres):
    assert p.parse_quantity(text) == pytest.approx(metres, rel=1e-9)


@pytest.mark.parametrize("text, reason", [
    ("1.25", "a number without a unit"),
    ("It is 3 in width.", "a number without a unit"),  # "in" here is not inches
    ("quite wide", "no length found"),
    ("1.2 meters or 2 meters", "several different values"),
    ("-1 meters", "negative length"),
    ("<think> 2 meters </think>", "no length found"),  # the answer never came
    ("<answer> 1 m </answer> <answer> 2 m </answer>", "several different <answer> blocks"),
])
def test_unreadable_quantities_are_errors_never_guesses(text, reason):
    with pytest.raises(p.AnswerParseError, match=reason):
        p.parse_quantity(text)


def test_a_bare_number_is_read_only_when_the_spec_names_its_unit():
    spec = p.OBJECT.with_options(bare_number_unit="m")
    assert p.parse_object_answer("width_data", "0.85", spec=spec) == 0.85
    with pytest.raises(p.AnswerParseError):
        p.parse_object_answer("width_data", "0.85")


@given(st.floats(min_value=0.0, max_value=500.0), st.sampled_from(p.QUANTITY_UNITS))
@settings(max_examples=200, deadline=None)
def test_formatted_quantities_parse_back_within_their_rounding(metres, unit):
    text = p.format_object_answer("direct_distance", metres, [A, B], unit=unit)
    assert text.endswith(f" {unit} apart.")
    assert p.parse_quantity(text) == pytest.approx(metres, abs=0.005 * p.LENGTH_UNITS[unit] + 1e-9)


@pytest.mark.parametrize("text, verdict", [
    ("Yes.", True), ("Yes, it is.", True), ("Correct, you'll find A to the left of B.", True),
    ("Indeed, A is positioned on the left side of B.", True), ("That is True.", True), ("true", True),
    ("No.", False), ("No, it is not.", False), ("Incorrect, A is not on the left side of B.", False),
    ("That is False.", False), ("In fact, A is to the right of B.", False), ("Actually, A is below B.", False),
    ("Actually, yes: it is.", True), ("<answer> No </answer>", False), ("It is not.", False),
    ("A isn't left of B.", False), (SAMPLE_ANSWER, False),
    ("Correct, " + A + " occupies less space than " + B + ".", True),
])
def test_yes_no_wordings(text, verdict):
    assert p.parse_verdict(text) is verdict


@pytest.mark.parametrize("text", ["A is to the left of B.", "Yes and no.", "", "<think> yes </think>"])
def test_unclear_verdicts_are_errors(text):
    with pytest.raises(p.AnswerParseError):
        p.parse_verdict(text)


def test_choices_name_one_of_the_questions_regions():
    regions = [(0, 39, 652, 999), (6, 380, 228, 562)]
    assert p.parse_choice(f"{B} is more to the left.", regions) == 1
    assert p.parse_choice(f"From the viewer's perspective, {A} appears more on the left side.", regions) == 0
    for bad in ("The lamp is more to the left.", f"{A} is left of {B}.", "bounding box region (1, 2, 3, 4) is left."):
        with pytest.raises(p.AnswerParseError):
            p.parse_choice(bad, regions)
    with pytest.raises(p.ProtocolError, match="needs the question's regions"):
        p.parse_object_answer("left_choice", f"{A} is more to the left.")
