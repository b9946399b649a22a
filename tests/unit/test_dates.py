from common.dates import format_date


def test_rfc5322_date_in_utc_with_numeric_zone() -> None:
    assert format_date(0) == "Thu, 01 Jan 1970 00:00:00 +0000"
    assert format_date(1_700_000_000.9) == "Tue, 14 Nov 2023 22:13:20 +0000"


def test_the_second_a_time_falls_in_whatever_was_asked_before() -> None:
    # one formatting per second is kept (common/dates.py): the next second is its own date
    assert format_date(1_700_000_000.999999) == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert format_date(1_700_000_001.0) == "Tue, 14 Nov 2023 22:13:21 +0000"
    assert format_date(1_700_000_000.5) == "Tue, 14 Nov 2023 22:13:20 +0000"
