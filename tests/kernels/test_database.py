"""The installed kernel database: listing, newest versions, one-line lookup errors."""

import pytest

import diffmodel.kernels as dk

from helpers import needs_db


@needs_db
def test_listing_and_one_line_errors():
    listing = dk.list_kernel_tables()
    assert {"system", "family", "backend", "version", "path"} <= set(listing.columns)
    h100 = listing[(listing["system"] == "h100_sxm") & (listing["backend"] == "vllm")]
    assert {"gemm", "prefill_attention", "moe", "allreduce"} <= set(h100["family"])
    for args, match in (
        (("nope", "vllm", "gemm"), "system 'nope'"),
        (("h100_sxm", "nope", "gemm"), "backend|backends"),
        (("h100_sxm", "vllm", "gemm", "9.9.9"), "version '9.9.9'"),
        (("h100_sxm", "vllm", "mla"), "unknown family"),
    ):
        with pytest.raises(ValueError, match=match) as err:
            dk.find_table(*args)
        assert "\n" not in str(err.value)
    # Newest version by number, not by string: 0.24.0 after 0.19.0.
    assert dk.find_table("h100_sxm", "vllm", "allreduce").version == "0.24.0"
