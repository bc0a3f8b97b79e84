"""NExT-GQA in the `nextqa` source of `local_media`: text answers, its grounding file (gsub_*.json),
and the spans stored in clip time. Files are in NExT-GQA's own format (doc-doc/NExT-GQA
datasets/nextgqa/); the clip is a tiny real one, as in test_local_media."""

import json

import numpy as np
import pytest

from mirasol3b_data import readers
from mirasol3b_data.builders.local_media import local_media
from test_local_media import _build, _clip, _clips, _report, _split_items, _write_csv, _write_json

HEADER = ["video_id", "frame_count", "width", "height", "question", "answer", "qid", "type",
          "a0", "a1", "a2", "a3", "a4"]
OPTIONS = ["share with the girl", "approach lady sitting there", "unwrap it", "playing with toy train", "gesture"]


def _row(video, question, qid, answer="unwrap it", qtype="CW"):
    return [video, 2697, 640, 480, question, answer, qid, qtype, *OPTIONS]


def test_read_nextgqa(tmp_path):
    path = _write_csv(tmp_path / "val.csv", [
        _row(4882821564, "why did the boy pick up one present", 1),
        _row(4882821564, "what did the boy do after that", 2, "gesture", "TN"),  # not in gsub's location
        _row(2435100235, "how does the man sell the watch", 7, qtype="CH"),  # video not in gsub
        _row(2482028659, "what does the lady do", 7, qtype="TN"),  # an end past the duration
        _row(2482028659, "why is the lady dancing", 5),  # end before start
        _row(2482028659, "how does the man feel", 6),  # starts after the video ends
        _row(2482028659, "why did he stop", 8),  # not a list of spans
        _row(10001787725, "what is on the table", 1),  # an entry without "location"
    ], HEADER)
    gsub = _write_json(tmp_path / "gsub_val.json", {
        "4882821564": {"duration": 90, "location": {"1": [[1.2, 5.8]], "3": [[12.1, 17.1], [20.0, 23.5]]},
                       "fps": 29.97},
        "2482028659": {"duration": 21, "location": {"7": [[0.0, 6.1], [9.2, 21.5]], "5": [[8.0, 3.0]],
                                                    "6": [[22.0, 23.0]], "8": "1.2-5.8"}, "fps": 29.97},
        "10001787725": {"duration": 34, "fps": 29.97}})
    mapping = _write_json(tmp_path / "map_vid_vidorID.json", {"4882821564": "1025/4882821564",
                                                              "2435100235": "0000/2435100235",
                                                              "2482028659": "1001/2482028659",
                                                              "10001787725": "1164/10001787725"})
    good, bad = _split_items(readers.read_nextqa(path, "videos", mapping, gsub))
    assert good == {
        2: {"video": "videos/1025/4882821564.mp4", "question": "why did the boy pick up one present",
            "answer": "unwrap it", "question_type": "CW", "evidence": [[1.2, 5.8]]},
        3: {"video": "videos/1025/4882821564.mp4", "question": "what did the boy do after that",
            "answer": "gesture", "question_type": "TN"},
        4: {"video": "videos/0000/2435100235.mp4", "question": "how does the man sell the watch",
            "answer": "unwrap it", "question_type": "CH"},
        5: {"video": "videos/1001/2482028659.mp4", "question": "what does the lady do", "answer": "unwrap it",
            "question_type": "TN", "evidence": [[0.0, 6.1], [9.2, 21.0]]}}
    assert sorted(bad) == [6, 7, 8, 9]
    assert "gsub_val.json: question 5 of video 2482028659" in bad[6].detail and "[8.0, 3.0]" in bad[6].detail
    assert "within the video's 21 s" in bad[7].detail
    assert "'1.2-5.8'" in bad[8].detail and "video 10001787725" in bad[9].detail
    checked = readers.check_record(good[5])  # what the builder makes of a record
    assert checked.evidence == ((0.0, 6.1), (9.2, 21.0)) and readers.check_record(good[3]).evidence == ()

    # Without the grounding file: the same questions, none located; the NExT-QA layout (an option
    # index) reads as before, and its text answers would be a bad row naming the column to use.
    without, none_bad = _split_items(readers.read_nextqa(path, "videos"))
    assert sorted(without) == list(range(2, 10)) and not none_bad
    assert not any("evidence" in r for r in without.values())
    assert without[2] == {k: v for k, v in good[2].items() if k != "evidence"} | {"video": "videos/4882821564.mp4"}
    nextqa = _write_csv(tmp_path / "test.csv", [
        [4882821564, 2697, 640, 480, "why did the boy pick up one present", 2, 1, "CW", *OPTIONS],
        [4882821564, 2697, 640, 480, "what did the boy do after that", "gesture", 2, "TN", *OPTIONS]],
        ["video", *HEADER[1:]])
    good, bad = _split_items(readers.read_nextqa(nextqa, "videos", None, gsub))
    assert good == {2: {"video": "videos/4882821564.mp4", "question": "why did the boy pick up one present",
                        "answer": "unwrap it", "question_type": "CW", "evidence": [[1.2, 5.8]]}}
    assert list(bad) == [3] and "'gesture' is not an option index" in bad[3].detail and "video_id" in bad[3].detail


def test_an_unreadable_grounding_file_names_itself(tmp_path):
    path = _write_csv(tmp_path / "val.csv", [_row(4882821564, "why?", 1)], HEADER)
    gsub = tmp_path / "gsub_val.json"
    gsub.write_text(json.dumps({"4882821564": {"duration": 90, "location": {"1": [[1.2, 5.8]]}}})[:25])
    with pytest.raises(ValueError, match=f"{gsub}: not valid JSON"):
        list(readers.read_nextqa(path, "videos", None, gsub))
    gsub.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=f"{gsub}: not valid JSON"):
        list(readers.read_nextqa(path, "videos", None, gsub))
    gsub.write_text("[]")
    with pytest.raises(ValueError, match=f"{gsub}: expected a JSON object, got list"):
        list(readers.read_nextqa(path, "videos", None, gsub))


def test_nextqa_build_stores_nextgqa_spans_in_clip_time(tmp_path):
    """The tiny geometry keeps the first 1 s (4 snippets) of a 1.5 s clip: a span is cut to it, one
    wholly after it is left out (its question kept), and a malformed one is a skipped row."""
    manual = tmp_path / "manual"
    (manual / "videos" / "1025").mkdir(parents=True)
    _clip(manual / "videos" / "1025" / "4882821564.mp4", seed=3)
    _write_json(manual / "map_vid_vidorID.json", {"4882821564": "1025/4882821564"})
    _write_csv(manual / "val.csv", [_row(4882821564, "why did the boy pick it up", 1),
                                    _row(4882821564, "what did he do next", 2, "gesture", "TN"),
                                    _row(4882821564, "how did he open it", 3, qtype="CH"),
                                    _row(4882821564, "why did he smile", 4),
                                    _row(4882821564, "what did he throw", 5, qtype="TN")], HEADER)
    _write_json(manual / "gsub_val.json", {"4882821564": {"duration": 1.5, "fps": 16, "location": {
        "1": [[0.2, 0.6], [0.75, 1.4]], "2": [[1.1, 1.5]], "4": [[0.5, 0.5]], "5": [[0.0, 0.5], [1.2, 2.0]]}}})
    _, fingerprint = local_media._read("nextqa", manual)
    assert sorted(fingerprint["annotations"]) == ["gsub_val.json", "map_vid_vidorID.json", "val.csv"]

    builder = _build(manual, tmp_path / "out", "nextqa_tiny")
    (clip,) = _clips(builder, "validation")
    assert int(clip["num_snippets"]) == 4  # 1 s
    prompts = [p.decode() for p in clip["texts"]["prompt"]]
    assert prompts == ["why did the boy pick it up", "what did he do next", "how did he open it", "what did he throw"]
    evidence = clip["evidence"]
    stored = [(prompts[i], round(float(a), 4), round(float(b), 4))
              for i, a, b in zip(evidence["text"], evidence["start"], evidence["end"])]
    assert stored == [("why did the boy pick it up", 0.2, 0.6), ("why did the boy pick it up", 0.75, 1.0),
                      ("what did he throw", 0.0, 0.5)]
    assert [(r["reason"], r["annotation"], r["line"]) for r in _report(builder)] == [("bad_annotation", "val.csv", 5)]
    assert evidence["start"].dtype == np.float32 and evidence["text"].dtype == np.int32
