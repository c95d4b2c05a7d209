"""ScienceQA scoring against a hand-checked fixture (tests/assets/score/).

The fixture's test split has 20 problems. Per problem: subject, context (T = non-empty
hint, I = image, - = neither), grade, topic, options, answer, prediction, outcome
(y = right, n = wrong, U = unparsed: null, "FAILED" or -1):

    qid subj ctx grade topic                 n ans pred      outcome
    101 NAT  T   1     physics               2  0  0         y
    102 NAT  I   2     physics               3  1  1         y
    103 NAT  TI  3     biology               4  2  0         n
    104 NAT  -   4     biology               2  1  null      U
    105 NAT  -   7     chemistry             2  0  0         y
    106 NAT  T   8     chemistry             4  3  3         y
    107 NAT  I   9     earth-science         3  0  2         n
    108 SOC  I   5     geography             4  0  0         y
    109 SOC  T   6     geography             4  2  "FAILED"  U
    110 SOC  TI  10    us-history            2  1  1         y
    111 SOC  -   11    economics             2  1  0         n   (image is "", so no image)
    112 SOC  I   12    us-history            3  2  2         y
    113 LAN  -   1     vocabulary            2  0  0         y
    114 LAN  T   2     grammar               3  1  "B"       y
    115 LAN  -   3     vocabulary            2  1  -1        U
    116 LAN  T   7     figurative-language   2  0  1         n
    117 LAN  -   8     grammar               4  3  3         y
    118 LAN  T   12    figurative-language   2  1  "B"       y
    119 NAT  I   6     physics               2  1  null      U
    120 SOC  -   9     economics             3  0  0         y

Right: 101 102 105 106 108 110 112 113 114 117 118 120 = 12 of 20; unparsed 4.
"""

import json
import random
from pathlib import Path

import pytest

from pill.errors import DataError
from pill.eval.scienceqa_score import (
    CATEGORY_KEYS,
    SCORE_KEYS,
    categories,
    format_table,
    load_predictions,
    score,
    score_file,
)

ASSETS = Path(__file__).parent / "assets" / "score"
PREDICTIONS = ASSETS / "predictions.json"

# Unparsed answers counted wrong:
EXPECTED = {
    "NAT": 50.0,  # 101 102 103 104 105 106 107 119: right 101 102 105 106 -> 4/8
    "SOC": 400 / 6,  # 108 109 110 111 112 120: right 108 110 112 120 -> 4/6 = 66.67
    "LAN": 400 / 6,  # 113-118: right 113 114 117 118 -> 4/6
    "TXT": 62.5,  # 101 103 106 109 110 114 116 118: right 101 106 110 114 118 -> 5/8
    "IMG": 400 / 7,  # 102 103 107 108 110 112 119: right 102 108 110 112 -> 4/7 = 57.14
    "NO": 400 / 7,  # 104 105 111 113 115 117 120: right 105 113 117 120 -> 4/7
    "G1-6": 50.0,  # 101 102 103 104 108 109 113 114 115 119: right 101 102 108 113 114 -> 5/10
    "G7-12": 70.0,  # 105 106 107 110 111 112 116 117 118 120: right all but 107 111 116 -> 7/10
    "Avg": 60.0,  # 12/20
}
EXPECTED_TOPICS = {
    "biology": 0.0,  # 103 n, 104 U
    "chemistry": 100.0,  # 105 106
    "earth-science": 0.0,  # 107 n
    "economics": 50.0,  # 111 n, 120 y
    "figurative-language": 50.0,  # 116 n, 118 y
    "geography": 50.0,  # 108 y, 109 U
    "grammar": 100.0,  # 114 117
    "physics": 200 / 3,  # 101 y, 102 y, 119 U
    "us-history": 100.0,  # 110 112
    "vocabulary": 50.0,  # 113 y, 115 U
}


def _fixture():
    problems = json.loads((ASSETS / "problems.json").read_text())
    splits = json.loads((ASSETS / "pid_splits.json").read_text())
    return problems, splits


def _assert_scores(scores, expected, topics):
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value), key
    assert scores["topics"] == pytest.approx(topics)
    assert list(scores["topics"]) == sorted(topics)


def test_fixture_scores_by_hand():
    scores = score_file(PREDICTIONS, ASSETS, "test")
    _assert_scores(scores, EXPECTED, EXPECTED_TOPICS)
    assert scores["count"] == 20
    assert scores["unparsed"] == 4


def test_keys_and_json_round_trip():
    scores = score_file(PREDICTIONS, ASSETS)
    assert tuple(scores) == SCORE_KEYS
    assert SCORE_KEYS == ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg", "topics", "count", "unparsed")
    assert json.loads(json.dumps(scores)) == scores


def test_official_fallback_seed_0():
    # random.Random(0) draws, in split order, for the unparsed 104 (2 options), 109 (4),
    # 115 (2), 119 (2): choice(range(2)) = 1, choice(range(4)) = 3, 0, 1.
    rng = random.Random(0)
    assert [rng.choice(range(n)) for n in (2, 4, 2, 2)] == [1, 3, 0, 1]
    # So 104 -> 1 (right), 109 -> 3 (wrong), 115 -> 0 (wrong), 119 -> 1 (right):
    # two more right, both NAT and grade <= 6; 104 is NO and biology, 119 is IMG and physics.
    expected = dict(EXPECTED, NAT=75.0, IMG=500 / 7, NO=500 / 7, **{"G1-6": 70.0}, Avg=70.0)
    topics = dict(EXPECTED_TOPICS, biology=50.0, physics=100.0)
    scores = score_file(PREDICTIONS, ASSETS, official_fallback=True, seed=0)
    _assert_scores(scores, expected, topics)
    assert scores["TXT"] == 62.5  # neither 104 nor 119 has a hint
    assert scores["unparsed"] == 4  # still reported
    random.seed(123)  # the global generator plays no part
    assert score_file(PREDICTIONS, ASSETS, official_fallback=True, seed=0) == scores


def test_official_fallback_seed_3():
    # random.Random(3) draws 0, 1, 1, 1: 104 wrong, 109 wrong, 115 right (LAN), 119 right (NAT).
    scores = score_file(PREDICTIONS, ASSETS, official_fallback=True, seed=3)
    assert scores["Avg"] == pytest.approx(70.0)  # 12 + 2 = 14/20
    assert scores["LAN"] == pytest.approx(500 / 6)
    assert scores["NAT"] == pytest.approx(62.5)  # 5/8


def test_empty_category_is_none_and_dash():
    # minitest = 101 (NAT, hint, grade1, right) and 105 (NAT, no context, grade7, right).
    problems, splits = _fixture()
    predictions = load_predictions(PREDICTIONS)
    scores = score(predictions, problems, splits["minitest"])
    assert scores["NAT"] == 100.0 and scores["SOC"] is None and scores["LAN"] is None
    assert scores["TXT"] == 100.0 and scores["NO"] == 100.0 and scores["IMG"] is None
    assert scores["G1-6"] == 100.0 and scores["G7-12"] == 100.0
    assert scores["topics"] == {"chemistry": 100.0, "physics": 100.0}
    assert scores["count"] == 2 and scores["unparsed"] == 0
    table = format_table(scores)
    assert "| 100.00 | - | - | 100.00 | - | 100.00 | 100.00 | 100.00 | 100.00 |" in table


def test_nothing_scored():
    problems, _ = _fixture()
    scores = score({}, problems, [])
    assert all(scores[key] is None for key in CATEGORY_KEYS)
    assert scores["topics"] == {} and scores["count"] == 0 and scores["unparsed"] == 0


def test_missing_and_out_of_range_predictions_are_unparsed():
    problems, _ = _fixture()
    # 101 has 2 options: index 2 is out of range; 102 has no prediction at all; True is no index.
    scores = score({"101": 2, "103": True}, problems, ["101", "102", "103"])
    assert scores["unparsed"] == 3 and scores["Avg"] == 0.0


def test_categories_follow_the_official_definitions():
    problems, _ = _fixture()
    assert categories(problems["103"]) == ["NAT", "TXT", "IMG", "G1-6", "Avg"]
    assert categories(problems["111"]) == ["SOC", "NO", "G7-12", "Avg"]  # image "" is no image
    assert categories(problems["119"]) == ["NAT", "IMG", "G1-6", "Avg"]
    # A caption is not a hint: it never makes a problem TXT.
    assert "TXT" not in categories(dict(problems["119"], caption="A magnet."))
    assert categories({"subject": "language science", "hint": None, "image": None, "grade": "grade12"}) == [
        "LAN", "NO", "G7-12", "Avg"
    ]


def test_format_table():
    table = format_table(score_file(PREDICTIONS, ASSETS))
    lines = table.splitlines()
    assert lines[0] == "| NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 | Avg |"
    assert lines[2] == "| 50.00 | 66.67 | 66.67 | 62.50 | 57.14 | 57.14 | 50.00 | 70.00 | 60.00 |"
    assert "| physics | 66.67 |" in table
    assert "| biology | 0.00 |" in table
    assert lines[-1] == "scored: 20, unparsed answers: 4"


# --- load_predictions ---------------------------------------------------------------


def _write(tmp_path, obj, name="preds.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_load_official_format():
    preds = load_predictions(PREDICTIONS)
    assert preds["101"] == 0 and preds["114"] == 1
    assert preds["104"] is None and preds["109"] is None and preds["115"] is None
    assert len(preds) == 20


def test_load_plain_mapping_and_letters(tmp_path):
    path = _write(tmp_path, {"1": 0, "2": "C", "3": "b", "4": "(D)", "5": "2", "6": None, "7": -1, "8": 3.0})
    assert load_predictions(path) == {"1": 0, "2": 2, "3": 1, "4": 3, "5": 2, "6": None, "7": None, "8": 3}


@pytest.mark.parametrize(
    "content,match",
    [
        ("{not json", "malformed predictions at line 1"),
        ("[1, 2]", "expected"),
        ('{"results": {"1": "maybe"}}', "'1'"),
        ('{"1": [0]}', "'1'"),
        ('{"1": 1.5}', "'1'"),
        ('{"1": true}', "'1'"),
    ],
)
def test_load_malformed_names_file(tmp_path, content, match):
    path = _write(tmp_path, content)
    with pytest.raises(DataError, match=match) as err:
        load_predictions(path)
    assert str(path) in str(err.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_predictions(tmp_path / "nope.json")


def test_qids_outside_the_split_are_rejected(tmp_path):
    path = _write(tmp_path, {"results": {"101": 0, "201": 0, "203": 1}})
    with pytest.raises(DataError, match="2 predicted qid") as err:
        score_file(path, ASSETS, "test")
    message = str(err.value)
    assert str(path) in message and "'201'" in message and "'203'" in message and "'test'" in message


def test_subset_of_split_is_scored(tmp_path):
    # A --limit-ed run: only 101 (right) and 103 (wrong) predicted.
    path = _write(tmp_path, {"results": {"103": 0, "101": 0}})
    scores = score_file(path, ASSETS, "test")
    assert scores["count"] == 2 and scores["Avg"] == 50.0 and scores["SOC"] is None


def test_unknown_split_and_missing_data(tmp_path):
    with pytest.raises(DataError, match="no split 'bogus'.*minitest"):
        score_file(PREDICTIONS, ASSETS, "bogus")
    with pytest.raises(DataError, match="problems.json"):
        score_file(PREDICTIONS, tmp_path, "test")


# --- pill score scienceqa -----------------------------------------------------------


def _run_cli(argv):
    import argparse

    from pill.eval import commands

    parser = argparse.ArgumentParser(prog="pill")
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_json(capsys):
    rc = _run_cli(["score", "scienceqa", "--predictions", str(PREDICTIONS), "--data", str(ASSETS), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == list(SCORE_KEYS)
    assert out["Avg"] == 60.0 and out["unparsed"] == 4 and out["count"] == 20


def test_cli_table_and_fallback(capsys):
    argv = ["score", "scienceqa", "--predictions", str(PREDICTIONS), "--data", str(ASSETS), "--official-fallback"]
    assert _run_cli(argv) == 0
    out = capsys.readouterr().out
    assert "| 75.00 | 66.67 | 66.67 | 62.50 | 71.43 | 71.43 | 70.00 | 70.00 | 70.00 |" in out


def test_cli_notes_unscored_problems(tmp_path, capsys):
    path = _write(tmp_path, {"101": "A"})
    _run_cli(["score", "scienceqa", "--predictions", str(path), "--data", str(ASSETS)])
    assert "19 of 20 problems" in capsys.readouterr().err
