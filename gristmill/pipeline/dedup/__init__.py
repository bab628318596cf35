"""`dedup`: exact and MinHash-LSH near-duplicate removal across the whole dataset.

Start with `stage.py` (the map -> shuffle -> reduce outline and its settings); `minhash.py` holds
the shingling, signatures and band hashes, vectorised with numpy.
"""
