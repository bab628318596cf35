"""gristmill: raw web pages in, pretraining tokens and a trained model out, every step inspectable."""

from pathlib import Path

__version__ = "0.1.0"

DATA_DIR = Path(__file__).parent / "data"
