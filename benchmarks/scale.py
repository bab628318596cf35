"""Scale checks: does gristmill stay within its memory budget on large inputs?

`--dedup-docs N`: the dedup stage on N short documents on a 2-worker LocalCluster (see
`benchmarks.dedup.memory`); the client's peak resident memory must stay <= 1.5 GB and each
worker's <= 3 GB at 2,000,000 documents.

Last line: {"benchmark": "scale", "dedup_client_gb": ..., "dedup_worker_gb": ..., "dedup_docs_per_s": ...}
"""

from __future__ import annotations

import argparse
import json

from benchmarks.dedup import memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200,000 documents instead of 2,000,000")
    parser.add_argument("--dedup-docs", type=int, default=None, help="documents for the dedup memory check")
    args = parser.parse_args()
    n = args.dedup_docs or (200_000 if args.quick else 2_000_000)
    dedup = memory(n)
    print(json.dumps({
        "benchmark": "scale",
        "dedup_docs": n,
        "dedup_client_gb": dedup["client_gb"],
        "dedup_worker_gb": dedup["worker_gb"],
        "dedup_docs_per_s": dedup["docs_per_s"],
        "dedup_rounds": dedup["rounds"],
        "dedup_client_target_gb": dedup["client_target_gb"],
        "dedup_worker_target_gb": dedup["worker_target_gb"],
    }))


if __name__ == "__main__":
    main()
