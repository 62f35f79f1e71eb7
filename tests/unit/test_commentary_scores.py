"""The commentary scores on hand-made texts: what counts as a repeat, a loop, a fact."""

from __future__ import annotations

from worker.tools.commentary_scores import (
    Scored,
    error_words,
    grounding,
    loops,
    named_facts,
    repeats,
    score_streams,
)

LINES = (
    "2026-11-23T10:00:03Z WARN  api: retrying connection to db-primary (attempt 5)\n"
    "2026-11-23T10:00:18Z INFO  db: GET /api/users/4999 503 718ms\n"
    "2026-11-23T10:01:10Z ERROR auth: connection refused: db-primary:5432"
)


def test_a_repeat_opens_with_the_same_eight_words_as_an_earlier_commentary() -> None:
    texts = [
        "The lines above are a retry of a cache entry for user 4622.",
        "The lines above are a retry for user 17.",
        "The lines above are a retry of a cache lookup, then a login.",
        "the LINES above, are a retry of a cache entry for someone!",
    ]
    assert repeats(texts) == [False, False, True, True]


def test_a_loop_is_a_four_word_run_said_three_times() -> None:
    twice = "the server running the request, the server running the request,"
    assert loops(twice + " the server running the request,")
    assert not loops(twice + " the server running")


def test_facts_are_numbers_and_identifiers_without_timestamps() -> None:
    assert named_facts(LINES) == {
        "5",
        "db-primary",
        "/api/users/4999",
        "4999",
        "503",
        "718",
        "db-primary:5432",
        "5432",
    }
    assert error_words(LINES) == {"warn", "error", "refused", "503"}
    assert error_words("a request failed and another timed out") == {"fail", "timeout"}


def test_grounding_counts_mentions_and_invention_counts_what_the_input_never_said() -> None:
    text = "Errors: user 4999 got 503 and db-primary refused; 8123 is made up."
    scored = grounding(text, covered=LINES, seen=LINES)
    # Of the 11 facts (8 named, then warn, error, refused) it names 4999, 503, db-primary,
    # error and refused.
    assert (scored.facts, scored.mentioned) == (11, 5)
    # It names 4999, 503, db-primary and 8123; only 8123 is nowhere in the input.
    assert (scored.named, scored.invented) == (4, 1)


def test_a_number_inside_a_longer_one_is_no_mention() -> None:
    assert grounding("user 49990 logged in", LINES, LINES).mentioned == 0


def test_the_report_pools_every_stream() -> None:
    first = [Scored("all quiet on db-primary", LINES, LINES)] * 2
    second = [Scored("nothing here nothing here nothing here nothing here", "x", "x")]
    report = score_streams([first, second], seconds_per_commentary=1.5)
    assert report.commentaries == 3
    assert report.repeat_rate == 1 / 3  # the second stream's one commentary repeats nothing
    assert report.loop_rate == 1 / 3
    assert report.invention == 0.0
    assert report.to_json_dict()["seconds_per_commentary"] == 1.5
