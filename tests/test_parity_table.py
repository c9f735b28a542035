"""`cbam-multi parity` output: columns stay aligned for any case name; the summary shows the largest error
per dtype and quantity (NaN included), the figures README quotes. Framework-free: rows are built by hand."""

import math

from cbam_multi.parity import CASES, Row, format_table, round_up, summarize

LONG = "seed-C8-B3-9x9-channel_pools=avg+max+lp+lse-gate=hard_sigmoid-and-then-some-more"


def rows():
    return [
        Row(LONG, "float32", "torch-infer-cl~oracle", "y", 2.4e-6, 1e-5),
        Row("seed-C16-B1-1x1", "float64", "torch->nnx", "grad", 1.0e-15, 1e-10),
        Row("timm-C1-B1-7x5-train", "float32", "nnx->torch", "grad", 1.04e-5, 1e-4),
        Row("timm-C1-B1-7x5-train", "float32", "linen~nnx", "stats", float("nan"), 1e-5),
    ]


def test_columns_align_for_any_case_name():
    table = format_table(rows()).split("\n\n")[0].splitlines()
    header, body = table[0], table[2:]
    for column in ("dtype", "check", "qty", "ok"):
        start = header.index(column)
        for line in body:  # every cell of the column starts where its header does
            assert line[start - 2 : start] == "  " and line[start] != " ", (column, line)
    ends = {line.index("e-", header.index("max err") - 2) for line in body if "nan" not in line}
    assert len(ends) == 1, "max err right-aligned"
    assert all(len(line) <= len(table[1]) for line in body)


def test_real_case_ids_fit():
    table = format_table([Row(c.id, "float64", "torch~oracle", "y", 0.0, 1e-10) for c in CASES])
    lines = table.split("\n\n")[0].splitlines()
    assert len({line.index("float64") for line in lines[2:]}) == 1


def test_summary_is_the_largest_error_per_dtype_and_quantity():
    worst = summarize(rows())
    assert worst["float32"]["y"] == 2.4e-6 and worst["float32"]["grad"] == 1.04e-5
    assert math.isnan(worst["float32"]["stats"])  # a NaN is never hidden by a smaller number
    assert worst["float64"] == {"grad": 1.0e-15}
    summary = format_table(rows()).split("\n\n")[1].splitlines()
    assert summary[0].split() == ["largest", "error", "y", "grad", "stats"]
    assert summary[1].split() == ["float64", "-", "1.0e-15", "-"]
    assert summary[2].split() == ["float32", "2.4e-06", "1.1e-05", "nan"]  # 1.04e-5 rounds up: a bound
    assert "FAIL" in format_table(rows())


def test_round_up_is_an_upper_bound_with_two_digits():
    assert round_up(1.04e-5) == 1.1e-5 and round_up(1.1e-5) == 1.1e-5 and round_up(2.68e-6) == 2.7e-6
    assert round_up(9.95e-7) == 1.0e-6 and round_up(0.0) == 0.0 and math.isnan(round_up(float("nan")))
    for x in (1.234e-15, 5.55e-17, 3.0e-6, 9.999e-3):
        assert x <= round_up(x) <= x * 1.1 + 1e-300
