"""The host model's fitted regime gates per deployment, on the temporal training rows.

Fits ``diffmodel.host.fit_host`` (hierarchical and per-model, ``step.duration_us``,
the gate form chosen on the validation rows) on the study's temporal split and prints
each deployment's fitted host factors: where the gate from graph replay to eager
launches sits, and what each regime costs.
"""

import pandas as pd

from diffmodel.data import add_targets, default_data_dir, load_steps, temporal_split
from diffmodel.host import fit_host, host_table


def main(*, kinds=("hierarchical", "per-model"), max_steps: int = 500) -> pd.DataFrame:
    """Fit each kind and print its host table; returns the tables stacked."""
    frame = add_targets(load_steps(default_data_dir() / "stepml" / "steps.parquet"))
    split = temporal_split(frame)
    tables = []
    for kind in kinds:
        fitted = fit_host(
            frame[split == "train"],
            frame[split == "valid"],
            kind=kind,
            target="step_duration_us",
            max_steps=max_steps,
        )
        table = host_table(fitted).assign(kind=kind)
        scores = ", ".join(f"{g} {v:.1f}%" for g, v in fitted.valid_mape.items())
        print(f"\n{kind}: gate on {fitted.gate_on} (validation MAPE {scores})")
        print(table.drop(columns=["kind"]).round(2).to_string())
        tables.append(table)
    return pd.concat(tables)


if __name__ == "__main__":
    main()
