"""Workloads and knobs: bad arguments named."""

import numpy as np
import pytest

from diffmodel.scheduler import Knobs, make_workload


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("arrival_us", dict(arrival_us=[-1.0, 0.0])),
        ("arrival_us", dict(arrival_us=[np.nan, 0.0])),
        ("prompt_tokens", dict(prompt_tokens=[0, 5])),
        ("prompt_tokens", dict(prompt_tokens=[2.5, 5])),
        ("output_tokens", dict(output_tokens=[-3, 5])),
        ("output_tokens", dict(output_tokens=[1, 2, 3])),
        ("cached_tokens", dict(cached_tokens=[-16, 0])),
        ("pad_to", dict(pad_to=1)),
    ],
)
def test_bad_workload(field, kwargs):
    args = dict(arrival_us=[0.0, 10.0], prompt_tokens=[4, 5], output_tokens=[2, 3])
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        make_workload(
            args.pop("arrival_us"),
            args.pop("prompt_tokens"),
            args.pop("output_tokens"),
            **args,
        )


@pytest.mark.parametrize(
    "field, knobs",
    [("max_num_batched_tokens", (0.0, 4.0)), ("max_num_seqs", (64.0, np.nan))],
)
def test_bad_knobs(field, knobs):
    with pytest.raises(ValueError, match=field):
        Knobs(*knobs)
