"""`crawl`: fetch pages from seed URLs into WARC files, politely, safely and resumably.

Start with `stage.py` (settings and the crawl loop); `frontier.py` decides what to fetch next,
`safety.py` which addresses may be reached, `state.py` keeps the resume state, `warc.py` writes
the WARC files, `serve.py` serves a folder on loopback for the demo, and `cli.py` is `gristmill crawl`.
"""
