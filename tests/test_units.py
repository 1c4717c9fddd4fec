"""tunedeck.core.units: each size and count style a screen or command prints, pinned."""

from __future__ import annotations

import pytest

from tunedeck.core.units import GIB, KIB, MIB, format_bytes, format_count, format_gib


def test_memory_figures_have_two_decimals_then_one_from_ten_gib():
    assert format_gib(0) == "0.00 GiB"
    assert format_gib(1.5 * GIB) == "1.50 GiB"
    assert format_gib(9.994 * GIB) == "9.99 GiB"
    assert format_gib(9.996 * GIB) == "10.0 GiB"
    assert format_gib(123.45 * GIB) == "123.5 GiB"


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (999, "999 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (19537920, "18.6 MiB"),
    (1.5 * GIB, "1.5 GiB"), (2048 * GIB, "2048.0 GiB"), (None, "?"),
])
def test_file_sizes_in_the_unit_that_fits(n, text):  # settings summary, Models screen, export
    assert format_bytes(n) == text


def test_file_sizes_on_the_command_line_go_up_to_tib():  # tunedeck models
    assert format_bytes(1023, largest="TiB") == "1023 B"
    assert format_bytes(2048 * GIB, largest="TiB") == "2.0 TiB"


@pytest.mark.parametrize("n, text", [
    (None, "?"), (0, "0 KiB"), (999, "1 KiB"), (1023, "1 KiB"), (1024, "1 KiB"), (988 * MIB, "988.0 MiB"),
    (int(2.3 * GIB), "2.3 GiB"),
])
def test_hub_sizes_from_whole_kib(n, text):  # the Hub search list and download dialogs
    assert format_bytes(n, smallest="KiB", specs={"KiB": ".0f"}) == text


@pytest.mark.parametrize("n, text", [(0, "0.0 KiB"), (1023, "1.0 KiB"), (3 * MIB, "3.0 MiB"), (1.5 * GIB, "1.50 GiB")])
def test_adapter_sizes_in_inspect(n, text):  # tunedeck inspect
    assert format_bytes(n, smallest="KiB", specs={"GiB": ".2f"}) == text


@pytest.mark.parametrize("n, text", [(0, "0.0 MiB"), (1000 * MIB, "1,000.0 MiB"), (1.5 * GIB, "1.50 GiB"),
                                     (1500 * GIB, "1,500.00 GiB")])
def test_pull_sizes_with_thousands_commas(n, text):  # tunedeck pull
    assert format_bytes(n, smallest="MiB", spec=",.1f", specs={"GiB": ",.2f"}) == text


@pytest.mark.parametrize("n, text", [(512 * KIB, "0.5 MiB"), (1000 * MIB, "1,000.0 MiB"), (1.5 * GIB, "1.50 GiB"),
                                     (12.345 * GIB, "12.3 GiB")])
def test_hub_disk_space_in_memory_style(n, text):  # core.hub's refusals
    assert format_bytes(n, smallest="MiB", spec=",.1f", memory_gib=True) == text


def test_hub_search_on_the_command_line_has_whole_mib():  # tunedeck models --search
    assert format_bytes(1000 * MIB, smallest="MiB", spec=",.0f", specs={"GiB": ",.2f"}) == "1,000 MiB"
    assert format_bytes(2 * GIB, smallest="MiB", spec=",.0f", specs={"GiB": ",.2f"}) == "2.00 GiB"


@pytest.mark.parametrize("n, text", [(None, "-"), ("x", "-"), (0, "0.0 GiB"), (1023, "0.0 GiB"),
                                     (1.5 * GIB, "1.5 GiB")])
def test_machine_panel_memory_in_gib_only(n, text):  # the training dashboard
    assert format_bytes(n, smallest="GiB", missing="-") == text


@pytest.mark.parametrize("n, text", [(0, "0"), (999, "999"), (1000, "1K"), (768_000, "768K"), (1_234_567, "1.23M"),
                                     (4.5e9, "4.5B"), (None, "?")])
def test_counts_with_three_significant_digits(n, text):  # parameter counts in the UI
    assert format_count(n) == text


@pytest.mark.parametrize("n, text", [(12, "12"), (950, "950"), (12_345, "12.3K"), (4_321_000, "4.3M"), (None, "?")])
def test_download_counts_with_one_decimal(n, text):  # the Hub search list
    assert format_count(n, spec=".1f") == text


def test_parameter_counts_on_the_command_line():  # tunedeck inspect (from K) and tunedeck models (from M)
    assert format_count(500, spec=".1f", specs={"B": ".2f"}, smallest="K") == "0.5K"
    assert format_count(1_240_000_000, spec=".1f", specs={"B": ".2f"}, smallest="K") == "1.24B"
    assert format_count(500_000, spec=".1f", specs={"B": ".2f"}, smallest="M") == "0.5M"
    assert format_count(12_300_000, spec=".1f", specs={"B": ".2f"}, smallest="M") == "12.3M"


def test_format_in_one_unit_whatever_the_size():
    from tunedeck.core.units import GIB, MIB, format_in

    assert format_in(80 * GIB, "GiB", ".0f") == "80 GiB"
    assert format_in(0.5 * GIB, "GiB") == "0.5 GiB"  # below a GiB, still in GiB
    assert format_in(3.5 * MIB, "MiB", ",.1f") == "3.5 MiB"
    assert format_in(5000 * MIB, "MiB", ",.1f") == "5,000.0 MiB"
