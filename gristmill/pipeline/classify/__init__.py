"""The `classify` stage: a learned quality filter (fastText), trained from positive and negative
examples or loaded from a file, that scores every document and keeps the best."""
