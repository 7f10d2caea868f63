"""The benchmark's tables: the coverage table of the methods with intervals."""

import numpy as np
import pandas as pd

from diffmodel._app._reproduce_tables import RESULT_COLUMNS, results_markdown


def test_coverage_table_lists_only_methods_with_intervals():
    rows = []
    for method, cov in (("a", np.nan), ("b", 0.9), ("c", 0.5)):
        for protocol in ("temporal", "lomo"):
            rows.append(
                dict.fromkeys(RESULT_COLUMNS, np.nan)
                | dict(
                    target="iteration_time",
                    protocol=protocol,
                    method=method,
                    experiment_id="e",
                    mape=1.0,
                    coverage90=cov,
                    width90=0.2,
                    note="",
                )
            )
    text = results_markdown(pd.DataFrame(rows))
    head = "### iteration_time — 90% intervals"
    table = text[text.index(head) :].splitlines()
    assert table[2] == "| method | temporal | lomo |"
    assert table[4:6] == [
        "| b | 90.0 (20.0) | 90.0 (20.0) |",
        "| c | 50.0 (20.0) | 50.0 (20.0) |",
    ]
