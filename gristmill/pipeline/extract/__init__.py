"""`extract`: WARC, WET and ARC records into clean text documents with a language guess.

Start with `stage.py` (settings, one work unit per archive, HTML to text); `archive.py` reads the
records of WARC/WET/ARC files, and `langid.py` labels each document's language.
"""
