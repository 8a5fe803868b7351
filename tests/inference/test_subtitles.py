"""inference/subtitles.py: captions as SubRip and WebVTT cues, worked out by hand."""

from casa_megatron.inference.subtitles import cues, srt, vtt


def test_cues_run_to_the_next_frame_and_silence_gets_none():
    items = cues([0.0, 0.5, 1.0, 3725.25], ["a cat", "  ", "two\n\n\nlines --> x", "late"], 0.5)
    assert items == [(0.0, 0.5, "a cat"), (1.0, 3725.25, "two\nlines -> x"), (3725.25, 3725.75, "late")]
    assert srt(items) == ("1\n00:00:00,000 --> 00:00:00,500\na cat\n\n"
                          "2\n00:00:01,000 --> 01:02:05,250\ntwo\nlines -> x\n\n"
                          "3\n01:02:05,250 --> 01:02:05,750\nlate\n\n")
    assert vtt(items).startswith("WEBVTT\n\n00:00:00.000 --> 00:00:00.500\na cat\n\n00:00:01.000 --> ")
    assert srt([]) == "" and vtt([]) == "WEBVTT\n\n"
