"""`pii`: find personal data and secrets in every document and replace them.

Start with `stage.py` (settings, replacement policies, the columns it adds); `detectors.py` holds
one detector per type (e-mail, phone, IP, IBAN, card, keys and tokens) behind one scanner.
"""
