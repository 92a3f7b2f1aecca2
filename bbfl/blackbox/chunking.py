"""How :meth:`~bbfl.blackbox.LocalBlackBox.forward` cuts (candidates x examples) into forwards.

Examples arrive sorted by length; a chunk's padded size is its count times its last example's length.
Pure helpers, no model: ``benchmarks/padding_chunks.py`` times them and ``tests/test_blackbox.py`` checks
their invariants (the cap, every example once per candidate, the padding bound).
"""

from collections.abc import Iterator

MIN_CHUNK_TOKENS = 2048  # padded cells a chunk holds before padding waste may end it
MAX_PADDING_RATIO = 1.05  # padded / real cells above which a full chunk ends (measured: benchmarks/padding_chunks.py)


def chunks(
    n_cand: int, lengths: list[int], max_tokens: int, min_tokens: int = MIN_CHUNK_TOKENS
) -> Iterator[tuple[slice, slice]]:
    """Yield (candidate slice, example slice) pairs whose padded size stays under ``max_tokens``.

    ``lengths`` are sorted ascending, so a chunk's padded length is its last example's length. A chunk
    also ends, once it holds ``min_tokens`` padded cells (enough to keep the matrix products efficient),
    where the next example would make more than 5% of its cells padding: one prompt over a test set
    of mixed lengths (AG News: 30 to 128 tokens) would otherwise run as one forward padded to the longest.
    """
    longest = max(lengths)
    cand_step = max(1, min(n_cand, max_tokens // longest))
    for c0 in range(0, n_cand, cand_step):
        cand = slice(c0, min(n_cand, c0 + cand_step))
        width = cand.stop - cand.start
        start = 0
        while start < len(lengths):
            stop, real = start + 1, lengths[start]
            while stop < len(lengths):
                padded = width * (stop + 1 - start) * lengths[stop]
                if padded > max_tokens:
                    break
                full = width * (stop - start) * lengths[stop - 1] >= min_tokens
                if full and padded > MAX_PADDING_RATIO * width * (real + lengths[stop]):
                    break
                real += lengths[stop]
                stop += 1
            yield cand, slice(start, stop)
            start = stop
