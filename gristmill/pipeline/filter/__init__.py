"""`filter`: the quality heuristics of C4, Gopher, RefinedWeb and FineWeb, one signal column each.

Start with `stage.py` (settings and the order of the rule families); `rules.py` holds each family's
vectorised rules, and `text.py` splits a partition's texts into words and lines once for all of them.
"""
