"""Score extraction for the eviction policies: a Triton kernel (`score_triton`) and its torch reference
(`score_reference`), same inputs and outputs; `scores.extract_scores` picks the one that can run.

Nothing is imported here: Triton chooses compiled or interpreted kernels when it is first imported, so it must
not be imported before the caller has set `TRITON_INTERPRET`."""
