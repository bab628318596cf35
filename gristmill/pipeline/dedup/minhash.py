"""MinHash signatures and LSH banding over whole partitions, in vectorised numpy.

The contract (all arrays are per partition, one row per document):

- `normalise_texts(texts, settings)`: the text every hash is taken of (NFKC, case, punctuation,
  digits, collapsed whitespace), with pyarrow compute kernels.
- `shingle_hashes(texts, shingle, ngram)`: 64-bit hashes of every word or character n-gram,
  flat, with per-document offsets. Tokens are hashed from their UTF-8 bytes with numpy (no Python
  loop per token); a document shorter than `ngram` tokens is one shingle.
- `one_permutation_signatures(hashes, offsets, num_perm, seed)`: `(n_docs, num_perm)` uint32 by
  one-permutation hashing with optimal densification: one hash per shingle (the default scheme).
- `minhash_signatures(hashes, offsets, permutations)`: `(n_docs, num_perm)` uint32 with
  `num_perm` permutations, datasketch's default scheme (`affine32`): each 64-bit shingle hash is
  folded to 32 bits, mixed by the MurmurHash3 finalizer, then `a * h + b mod 2**32` with odd `a`,
  the parameters drawn exactly as datasketch draws them from `seed`. Given the same 32-bit shingle
  hashes the signatures are identical to `datasketch.MinHash(num_perm, seed).update_batch`.
- `band_hashes(signatures, bands, rows)`: `(n_docs, bands)` uint64, one hash per LSH band.
- `optimal_bands_rows(threshold, num_perm, ...)`: the (bands, rows) pair minimising the weighted
  false-positive and false-negative areas under the LSH S-curve, as datasketch's `MinHashLSH`.
- `jaccard_pairs(hashes, offsets, a, b)`: true Jaccard similarity of many document pairs at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

EMPTY_SLOT = np.uint32(0xFFFFFFFF)  # signature value of a document with no shingles
SHINGLE_CHUNK = 1 << 16  # shingles per vectorised block: num_perm x 64k uint32 (32 MB at 128)

_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class Normalisation:
    """How text is normalised before exact hashes and shingles are taken."""

    nfkc: bool = True
    lowercase: bool = True
    punctuation: bool = True  # replace punctuation and symbols by spaces
    digits: bool = False  # replace every digit by 0 ("page 12" == "page 31")


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: an avalanching bijection on uint64 (wrapping arithmetic)."""
    h = h ^ (h >> np.uint64(33))
    h = h * _M1
    h = h ^ (h >> np.uint64(33))
    h = h * _M2
    return h ^ (h >> np.uint64(33))


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, as datasketch applies it before its affine permutations."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def normalise_texts(texts: pa.Array | pa.ChunkedArray, settings: Normalisation) -> pa.Array:
    """Normalised copies of `texts` (nulls become empty strings), whitespace collapsed to one space."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks() if texts.num_chunks else pa.array([], pa.string())
    texts = pc.fill_null(texts.cast(pa.string()), "")
    if settings.nfkc:
        texts = pc.utf8_normalize(texts, form="NFKC")
    if settings.lowercase:
        texts = pc.utf8_lower(texts)
    if settings.punctuation:
        texts = pc.replace_substring_regex(texts, pattern=r"[\p{P}\p{S}]+", replacement=" ")
    if settings.digits:
        texts = pc.replace_substring_regex(texts, pattern=r"\p{Nd}", replacement="0")
    texts = pc.replace_substring_regex(texts, pattern=r"[\s\p{Z}\x{0B}\x{85}]+", replacement=" ")
    return pc.utf8_trim_whitespace(texts)


def _string_offsets_and_bytes(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (int64, length n + 1, starting at 0) and the UTF-8 bytes of a string array."""
    strings = strings.cast(pa.large_string())
    _validity, offsets_buf, data_buf = strings.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[strings.offset : strings.offset + len(strings) + 1]
    if data_buf is None or offsets[-1] == offsets[0]:
        return offsets - offsets[0], np.zeros(0, dtype=np.uint8)
    data = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[-1]]
    return offsets - offsets[0], data


# Random 64-bit values, one per (position in the string mod 256, byte): a string hashes to the sum
# of its bytes' values (tabulation hashing), a few vectorised passes over the bytes of a partition.
_BYTE_TABLE = np.random.default_rng(0x6772697374).integers(0, 2**63, size=256 * 256, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def _span_hashes(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray, separator: np.ndarray | None) -> np.ndarray:
    """Hashes of the byte spans `data[starts[i] : starts[i] + lengths[i]]` (sorted, non-empty,
    separated only by bytes flagged in `separator`, which do not count)."""
    if len(starts) == 0:
        return np.zeros(0, dtype=np.uint64)
    # Position of each byte in its span, mod 2**16, as a running sum of steps: +1, and a jump back
    # to 0 at each span start (16-bit arithmetic wraps; only the position mod 256 is used).
    step = np.ones(data.size, dtype=np.uint16)
    step[starts[1:]] = (starts[:-1] - starts[1:] + 1).astype(np.uint16)
    step[starts[0]] = 0
    position = np.cumsum(step, dtype=np.uint16)
    position <<= np.uint16(8)
    position |= data
    mixed = _BYTE_TABLE[position]
    if separator is not None:
        mixed[separator] = 0
    sums = np.add.reduceat(mixed, starts)
    return fmix64(sums ^ (lengths.astype(np.uint64) * _GOLDEN))


def hash_strings(strings: pa.Array) -> np.ndarray:
    """A 64-bit hash of each string's UTF-8 bytes, vectorised (tabulation over (position, byte),
    finalised with the length). Deterministic across processes, machines and runs."""
    offsets, data = _string_offsets_and_bytes(strings)
    lengths = np.diff(offsets)
    out = np.zeros(len(lengths), dtype=np.uint64)
    nonempty = lengths > 0
    out[nonempty] = _span_hashes(data, offsets[:-1][nonempty], lengths[nonempty], None)
    out[~nonempty] = fmix64(np.zeros(int((~nonempty).sum()), dtype=np.uint64))
    return out


def _word_hashes(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the words of normalised texts (single spaces between words, none at the ends)."""
    offsets, data = _string_offsets_and_bytes(texts)
    if data.size == 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(len(offsets), dtype=np.int64)
    space = data == 32
    is_start = np.zeros(data.size + 1, dtype=bool)
    is_start[1:] = space  # a word starts after each space, and where each non-empty text starts
    is_start[offsets[:-1][np.diff(offsets) > 0]] = True
    starts = np.flatnonzero(is_start[: data.size])
    following = np.append(starts[1:], data.size)
    lengths = following - starts - space[following - 1]
    return _span_hashes(data, starts, lengths, space), np.searchsorted(starts, offsets).astype(np.int64)


def _token_hashes(texts: pa.Array, shingle: str) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the tokens (words, or unicode characters) of each text, flat, with offsets."""
    if shingle == "word":
        return _word_hashes(texts)
    if shingle == "char":
        lengths = np.asarray(pc.utf8_length(texts), dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        points = np.frombuffer("".join(texts.to_pylist()).encode("utf-32-le"), dtype=np.uint32)
        return fmix64(points.astype(np.uint64) + _GOLDEN), offsets
    raise ValueError(f"shingle must be 'word' or 'char', not {shingle!r}")


def _position_multipliers(ngram: int) -> np.ndarray:
    """Odd multipliers, one per position in a shingle, so that a shingle's hash depends on order."""
    return np.array([((2 * i + 1) * 0x9E3779B97F4A7C15 % (1 << 64)) | 1 for i in range(ngram)], dtype=np.uint64)


def shingle_hashes(texts: pa.Array, shingle: str = "word", ngram: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the `ngram`-token shingles of each (normalised) text.

    Returns `(hashes, offsets)`: document `i`'s shingles are `hashes[offsets[i]:offsets[i + 1]]`.
    A document with 1..ngram-1 tokens has one shingle (all its tokens); an empty one has none.
    """
    if ngram < 1:
        raise ValueError(f"ngram must be >= 1, not {ngram}")
    tokens, token_offsets = _token_hashes(texts, shingle)
    multipliers = _position_multipliers(ngram)
    n_tokens = np.diff(token_offsets)
    n_shingles = np.where(n_tokens > 0, np.maximum(n_tokens - ngram + 1, 1), 0)
    offsets = np.concatenate([[0], np.cumsum(n_shingles)]).astype(np.int64)
    hashes = np.zeros(offsets[-1], dtype=np.uint64)
    # Full windows over the flat token array; those that cross a document's end are dropped.
    windows = len(tokens) - ngram + 1
    if windows > 0:
        full = np.zeros(windows, dtype=np.uint64)
        for i in range(ngram):
            full += tokens[i : i + windows] * multipliers[i]
        doc_end = np.repeat(token_offsets[1:], n_tokens)[:windows]
        inside = np.arange(windows) + ngram <= doc_end
        long_docs = np.ones(len(hashes), dtype=bool)
        long_docs[offsets[:-1][(n_tokens > 0) & (n_tokens < ngram)]] = False
        hashes[long_docs] = full[inside]
    # Documents shorter than one window: one shingle of all their tokens.
    short = np.flatnonzero((n_tokens > 0) & (n_tokens < ngram))
    for i in range(min(ngram - 1, int(n_tokens[short].max(initial=0)))):
        has = n_tokens[short] > i
        hashes[offsets[short[has]]] += tokens[token_offsets[short[has]] + i] * multipliers[i]
    return fmix64(hashes), offsets


def permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The affine permutation parameters `(a, b)` (uint32, `a` odd) datasketch draws from `seed`."""
    generator = np.random.RandomState(seed)
    a = generator.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = generator.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def fold32(hashes: np.ndarray) -> np.ndarray:
    """64-bit shingle hashes folded to the 32-bit values the permutations act on."""
    return (hashes ^ (hashes >> np.uint64(32))).astype(np.uint32)


def minhash_signatures(hashes: np.ndarray, offsets: np.ndarray, perms: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """`(n_docs, num_perm)` uint32 MinHash signatures; a document with no shingles is all EMPTY_SLOT.

    The permutations are applied to blocks of SHINGLE_CHUNK shingles at once (one
    `(num_perm, block)` array), and each block's minima are taken per document with `reduceat`.
    """
    a, b = perms
    n_docs = len(offsets) - 1
    signatures = np.full((n_docs, len(a)), EMPTY_SLOT, dtype=np.uint32)
    mixed = fmix32(fold32(hashes))
    total = int(offsets[-1])
    doc_of_shingle_start = np.searchsorted(offsets, np.arange(0, total, SHINGLE_CHUNK), side="right") - 1
    for block, lo in enumerate(range(0, total, SHINGLE_CHUNK)):
        hi = min(lo + SHINGLE_CHUNK, total)
        first = doc_of_shingle_start[block]
        last = np.searchsorted(offsets, hi, side="left")  # documents [first, last) touch this block
        docs = np.arange(first, last)
        docs = docs[offsets[docs + 1] > offsets[docs]]  # skip empty documents
        segment_starts = np.maximum(offsets[docs], lo) - lo
        permuted = a[:, None] * mixed[None, lo:hi]  # (num_perm, block): contiguous rows reduce fast
        permuted += b[:, None]
        minima = np.minimum.reduceat(permuted, segment_starts, axis=1).T
        signatures[docs] = np.minimum(signatures[docs], minima)
    return signatures


def one_permutation_signatures(hashes: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int = 1) -> np.ndarray:
    """`(n_docs, num_perm)` uint32 signatures by one-permutation hashing with optimal densification
    (Li, Owen & Zhang 2012; Shrivastava 2017): each shingle is hashed once, the hash's high bits
    choose one of `num_perm` bins and its low bits are the value; each slot keeps its bin's
    minimum. An empty bin borrows the value of a non-empty bin chosen by a hash of (slot, attempt),
    the same sequence for every document, so that P(slot equal) = Jaccard as for `num_perm`
    permutations, at the cost of one hash per shingle instead of `num_perm`."""
    n_docs = len(offsets) - 1
    counts = np.diff(offsets)
    mixed = fmix64(hashes ^ np.uint64((seed * 0x9E3779B97F4A7C15) % (1 << 64)))
    bins = ((mixed >> np.uint64(32)) * np.uint64(num_perm)) >> np.uint64(32)
    slots = np.repeat(np.arange(n_docs, dtype=np.int64) * num_perm, counts) + bins.astype(np.int64)
    signatures = np.full(n_docs * num_perm, EMPTY_SLOT, dtype=np.uint32)
    np.minimum.at(signatures, slots, mixed.astype(np.uint32))
    signatures = signatures.reshape(n_docs, num_perm)
    filled = signatures != EMPTY_SLOT
    filled_rows = filled.any(axis=1)
    docs, slot = np.nonzero(~filled & filled_rows[:, None])
    borrowed = signatures.copy()
    for attempt in range(8 * num_perm):
        if docs.size == 0:
            break
        key = slot.astype(np.uint64) + np.uint64(attempt << 16)
        source = ((fmix64(key + _GOLDEN) >> np.uint64(32)) * np.uint64(num_perm)) >> np.uint64(32)
        source = source.astype(np.int64)
        hit = filled[docs, source]
        borrowed[docs[hit], slot[hit]] = signatures[docs[hit], source[hit]]
        docs, slot = docs[~hit], slot[~hit]
    for d, s in zip(docs.tolist(), slot.tolist()):  # after 8 x num_perm misses: the next filled bin
        source = (s + int(np.argmax(np.roll(filled[d], -s)))) % num_perm
        borrowed[d, s] = signatures[d, source]
    return borrowed


def signatures_for(hashes: np.ndarray, offsets: np.ndarray, scheme: str, num_perm: int, seed: int) -> np.ndarray:
    """Signatures by `scheme`: `one_permutation` (fast) or `datasketch` (num_perm affine permutations)."""
    if scheme == "one_permutation":
        return one_permutation_signatures(hashes, offsets, num_perm, seed)
    if scheme == "datasketch":
        return minhash_signatures(hashes, offsets, permutations(num_perm, seed))
    raise ValueError(f"scheme must be 'one_permutation' or 'datasketch', not {scheme!r}")


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """`(n_docs, bands)` uint64: band `k` hashes signature columns `[k * rows, (k + 1) * rows)`."""
    if bands * rows > signatures.shape[1]:
        raise ValueError(f"bands x rows = {bands} x {rows} needs {bands * rows} permutations, "
                         f"signatures have {signatures.shape[1]}")
    columns = signatures[:, : bands * rows].reshape(len(signatures), bands, rows).astype(np.uint64)
    h = np.full((len(signatures), bands), _GOLDEN, dtype=np.uint64)
    row_keys = np.arange(rows, dtype=np.uint64) * _GOLDEN  # array arithmetic wraps silently
    for k in range(rows):
        h = fmix64(h ^ (columns[:, :, k] + row_keys[k]))
    return h


def _collision_probability(similarity: np.ndarray, bands: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return 1.0 - (1.0 - similarity**rows) ** bands


def optimal_bands_rows(
    threshold: float, num_perm: int, false_positive_weight: float = 0.5, false_negative_weight: float = 0.5
) -> tuple[int, int]:
    """(bands, rows) with bands x rows <= num_perm minimising
    `fp_weight * area(P(candidate), 0..threshold) + fn_weight * area(1 - P(candidate), threshold..1)`,
    the criterion of datasketch's `MinHashLSH` (integrated here on a fine grid, all pairs at once)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be between 0 and 1, not {threshold}")
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], dtype=np.float64)
    bands, rows = pairs[:, :1], pairs[:, 1:]
    below = np.linspace(0.0, threshold, 401)[None, :]
    above = np.linspace(threshold, 1.0, 401)[None, :]
    false_positive = np.trapezoid(_collision_probability(below, bands, rows), below, axis=1)
    false_negative = np.trapezoid(1.0 - _collision_probability(above, bands, rows), above, axis=1)
    error = false_positive_weight * false_positive + false_negative_weight * false_negative
    best = int(np.argmin(error))
    return int(pairs[best, 0]), int(pairs[best, 1])


def candidate_pairs(hashes_per_band: np.ndarray) -> set[tuple[int, int]]:
    """Every pair of documents (row indices, smaller first) that share at least one band hash:
    what an LSH index returns, for measuring recall and precision in one process."""
    pairs: set[tuple[int, int]] = set()
    for band in range(hashes_per_band.shape[1]):
        column = hashes_per_band[:, band]
        order = np.argsort(column, kind="stable")
        sorted_hashes = column[order]
        boundaries = np.flatnonzero(np.diff(sorted_hashes)) + 1
        for group in np.split(order, boundaries):
            if len(group) > 1:
                members = np.sort(group)
                pairs.update((int(x), int(y)) for i, x in enumerate(members) for y in members[i + 1 :])
    return pairs


def jaccard_pairs(hashes: np.ndarray, offsets: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """True Jaccard similarity of documents `a[i]` and `b[i]` (row indices into `offsets`), for all
    pairs at once: the shingles of both ends of every pair are sorted by (pair, hash) and the
    repeats counted. Two documents without shingles have similarity 1."""
    n_docs = len(offsets) - 1
    doc = np.repeat(np.arange(n_docs), np.diff(offsets))
    order = np.lexsort((hashes, doc))
    doc, unique = doc[order], hashes[order]
    first = np.ones(len(unique), dtype=bool)
    first[1:] = (doc[1:] != doc[:-1]) | (unique[1:] != unique[:-1])
    doc, unique = doc[first], unique[first]
    sizes = np.bincount(doc, minlength=n_docs)
    starts = np.concatenate([[0], np.cumsum(sizes)])

    def gather(ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lengths = sizes[ends]
        pair = np.repeat(np.arange(len(ends)), lengths)
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return pair, unique[starts[ends][pair] + within]

    pair_a, hash_a = gather(a)
    pair_b, hash_b = gather(b)
    pair, merged = np.concatenate([pair_a, pair_b]), np.concatenate([hash_a, hash_b])
    order = np.lexsort((merged, pair))
    pair, merged = pair[order], merged[order]
    repeated = (pair[1:] == pair[:-1]) & (merged[1:] == merged[:-1])
    common = np.bincount(pair[1:][repeated], minlength=len(a))
    union = sizes[a] + sizes[b] - common
    return np.where(union > 0, common / np.maximum(union, 1), 1.0)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Fraction of equal signature slots, row by row: the MinHash estimate of Jaccard similarity."""
    return np.mean(sig_a == sig_b, axis=-1)


def signatures_of_texts(
    texts: Sequence[str] | pa.Array,
    normalisation: Normalisation = Normalisation(),
    shingle: str = "word",
    ngram: int = 5,
    num_perm: int = 128,
    seed: int = 1,
    scheme: str = "one_permutation",
) -> np.ndarray:
    """Normalise, shingle and sign raw texts in one call: `(n_docs, num_perm)` uint32."""
    array = texts if isinstance(texts, (pa.Array, pa.ChunkedArray)) else pa.array(list(texts), pa.string())
    hashes, offsets = shingle_hashes(normalise_texts(array, normalisation), shingle, ngram)
    return signatures_for(hashes, offsets, scheme, num_perm, seed)
