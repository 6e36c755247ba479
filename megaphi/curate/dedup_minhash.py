"""MinHash near-duplicate pieces: word shingles, signatures (datasketch), LSH band keys, and connected components.

A document's signature is datasketch's MinHash (affine32 scheme) over the 32-bit hashes of its set of word
n-grams; two documents with Jaccard similarity s agree on one band of r rows with probability s^r, so they share
at least one of b band keys with probability 1 - (1 - s^r)^b. `optimal_bands` picks (b, r) for a threshold.
"""

import hashlib
import re

import numpy as np

_WORD = re.compile(r"\w+")
_MIX = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio odd constant: spreads consecutive inputs


def shingles(text: str, ngram: int = 5) -> set:
    """The set of lowercased word n-grams of text, as bytes; a text of 1..ngram-1 words is one shingle."""
    words = _WORD.findall(text.lower())
    if len(words) < ngram:
        return {" ".join(words).encode()} if words else set()
    return {" ".join(words[i:i + ngram]).encode() for i in range(len(words) - ngram + 1)}


def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


class MinHasher:
    """Signatures of num_perm uint32 values (datasketch MinHash, affine32); picklable, permutations drawn once.

    Shingles are hashed without building their strings: each distinct word is hashed once (blake2b, cached),
    and each n-gram's 32-bit hash combines its words' hashes in order with numpy; datasketch then applies the
    permutations (update_batch, hashfunc=int: the values are already hashes). Same sets of shingles as
    `shingles`, about three times faster than sha1 over joined strings.
    """

    CACHE_WORDS = 1 << 20

    def __init__(self, num_perm: int = 256, ngram: int = 5, seed: int = 1):
        from datasketch import MinHash

        if num_perm < 2 or ngram < 1:
            raise ValueError(f"--num-perm must be >= 2 and --ngram >= 1 (got {num_perm}, {ngram})")
        self.num_perm, self.ngram, self.seed = num_perm, ngram, seed
        self._template = MinHash(num_perm=num_perm, seed=seed, hashfunc=int, scheme="affine32")
        self._words = {}

    def __getstate__(self):
        return {**self.__dict__, "_words": {}}

    def shingle_hashes(self, text: str) -> np.ndarray:
        """Distinct 32-bit hashes of the word n-grams of text (one for a text of 1..ngram-1 words)."""
        words, cache = _WORD.findall(text.lower()), self._words
        if len(cache) > self.CACHE_WORDS:
            cache.clear()
        values = list(map(cache.get, words))
        if None in values:
            for k, word in enumerate(words):
                if values[k] is None:
                    values[k] = cache[word] = cache[word] if word in cache else _word_hash(word)
        hashes = np.array(values, dtype=np.uint64)
        if not len(words):
            return np.zeros(0, dtype=np.uint32)
        n = min(self.ngram, len(words))
        with np.errstate(over="ignore"):
            h = np.full(len(words) - n + 1, np.uint64(n), dtype=np.uint64)
            for k in range(n):
                h = _fmix64((h ^ hashes[k:len(words) - n + 1 + k]) * _MIX)
        return np.unique((h >> np.uint64(32)).astype(np.uint32))

    def signature(self, text: str) -> tuple:
        """(uint32 signature, number of shingles); a text without words has no shingles (all-max signature)."""
        found = self.shingle_hashes(text)
        m = self._template.copy()
        m.update_batch(found.tolist())
        return np.asarray(m.hashvalues, dtype=np.uint32), len(found)

    def signatures(self, texts) -> tuple:
        """(n, num_perm) uint32 signatures and (n,) int32 shingle counts of texts."""
        sigs = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        counts = np.empty(len(texts), dtype=np.int32)
        for i, text in enumerate(texts):
            sigs[i], counts[i] = self.signature(text)
        return sigs, counts


def collision_probability(s, bands: int, rows: int):
    """Probability that two documents with Jaccard similarity s share at least one band key."""
    return 1.0 - (1.0 - np.asarray(s, dtype=np.float64) ** rows) ** bands


def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple:
    """(bands, rows) with bands * rows <= num_perm minimising the weighted false-positive area (pairs below the
    threshold that collide) plus false-negative area (pairs above it that do not)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"--threshold must be in (0, 1), got {threshold}")
    below = np.linspace(0.0, threshold, 513)
    above = np.linspace(threshold, 1.0, 513)
    best, best_error = (1, 1), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = np.trapezoid(collision_probability(below, bands, rows), below)
            fn = np.trapezoid(1.0 - collision_probability(above, bands, rows), above)
            error = fp_weight * fp + fn_weight * fn
            if error < best_error:
                best, best_error = (bands, rows), error
    return best


def _fmix64(h):
    """MurmurHash3's 64-bit finaliser, vectorised (uint64 arithmetic wraps, as intended)."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64 keys: one hash per band of `rows` signature values, salted by the band index, so equal
    keys mean (up to 64-bit collisions, which verification catches) equal bands in the same band position."""
    if bands * rows > sigs.shape[1]:
        raise ValueError(f"{bands} bands x {rows} rows need {bands * rows} permutations, signatures have "
                         f"{sigs.shape[1]}")
    values = sigs[:, :bands * rows].astype(np.uint64).reshape(len(sigs), bands, rows)
    with np.errstate(over="ignore"):
        h = np.broadcast_to(_fmix64(np.arange(1, bands + 1, dtype=np.uint64) * _MIX), (len(sigs), bands)).copy()
        for j in range(rows):
            h = _fmix64((h ^ values[:, :, j]) * _MIX)
    return h


def exact_keys(digests: np.ndarray) -> np.ndarray:
    """(n,) uint64 keys from (n, 16) uint8 content digests, salted apart from every band key."""
    with np.errstate(over="ignore"):
        return _fmix64(digests[:, :8].copy().view(np.uint64).ravel() ^ np.uint64(0xD6E8FEB86659FD93))


def components(edges: np.ndarray) -> tuple:
    """Union-find over edges (k, 2) of node ids: (nodes, roots), roots[i] the smallest id in nodes[i]'s
    component. Vectorised: hook each root onto the smaller root across every edge, then compress paths fully,
    until no edge joins two trees."""
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    nodes, index = np.unique(edges, return_inverse=True)
    u, v = index.reshape(-1, 2).T
    parent = np.arange(len(nodes))
    while True:
        pu, pv = parent[u], parent[v]
        split = pu != pv
        if not split.any():
            break
        lo, hi = np.minimum(pu[split], pv[split]), np.maximum(pu[split], pv[split])
        np.minimum.at(parent, hi, lo)  # hi is a root: it now points to a smaller index, so no cycle forms
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    return nodes, nodes[parent]  # nodes are sorted, so the smallest index is the smallest id
