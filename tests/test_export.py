"""`gristmill export --format hf`: each architecture, trained for real steps on real shards, loads in
`transformers` (Auto classes, no gristmill import) and gives gristmill's logits within 1e-4 (fp32,
CPU); settings with no equivalent are errors naming the setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gristmill.model.config import TrainConfig
from gristmill.model.export import NotExportable, export_hf
from gristmill.model.loop import train
from gristmill.model.sample import load_model

REPO = Path(__file__).resolve().parents[1]
TINY = dict(n_layer=2, n_head=4, n_embd=64, seq_len=64, batch_size=8, progress=False, max_steps=8, warmup_steps=2)
TEXT = "The Debian package manager installs <mask> from the archive"

EXPORTABLE = {
    "llama": dict(architecture="decoder", bias=True, tie_weights=False),
    "gpt2": dict(architecture="decoder", position="learned", mlp="gelu", norm="layernorm"),
    "bert": dict(architecture="encoder", position="learned", mlp="gelu", norm="layernorm", norm_placement="post"),
    "t5": dict(architecture="encoder_decoder", position="relative"),
}

# Runs in a fresh interpreter that never imports gristmill: the exported folders must stand alone.
LOAD_WITH_TRANSFORMERS = """
import json, sys
import numpy as np, torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM, AutoTokenizer
AUTO = {"decoder": AutoModelForCausalLM, "encoder": AutoModelForMaskedLM, "encoder_decoder": AutoModelForSeq2SeqLM}
for name, (folder, architecture) in json.loads(sys.argv[1]).items():
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(sys.argv[2], add_special_tokens=False, return_tensors="pt").input_ids
    model = AUTO[architecture].from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        if architecture == "encoder_decoder":
            logits = model(input_ids=ids, decoder_input_ids=ids[:, :7]).logits
        else:
            logits = model(input_ids=ids).logits
    np.save(f"{folder}/logits.npy", logits.numpy())
    np.save(f"{folder}/ids.npy", ids.numpy())
assert not any(m.startswith("gristmill") for m in sys.modules), "transformers needed gristmill"
"""

pytestmark = pytest.mark.usefixtures("one_thread")




def gristmill_logits(train_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    model, _, _ = load_model(train_dir)
    with torch.no_grad():
        if model.config.architecture == "encoder_decoder":
            logits, _ = model(ids, torch.zeros_like(ids[:, :7]), decoder_idx=ids[:, :7])
            return logits
        if model.config.architecture == "encoder":
            return model(ids)[0]
        return model.lm_head(model.decoder(model.embed(ids)))  # every position, not just the last


def test_every_architecture_exports_and_transformers_gives_the_same_logits(tmp_path, shards):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    folders = {}
    for name, options in EXPORTABLE.items():
        train(TrainConfig(**TINY | options), shards, tmp_path / name)
        if name == "bert":  # through the command line once; the others in process, to keep the test short
            result = subprocess.run(
                [sys.executable, "-m", "gristmill.cli", "export", str(tmp_path / name), "--format", "hf", str(tmp_path / f"{name}-hf")],
                env=env, capture_output=True, text=True, timeout=120,
            )
            assert result.returncode == 0, result.stderr[-3000:]
        else:
            export_hf(tmp_path / name, tmp_path / f"{name}-hf")
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
            p.name for p in (tmp_path / f"{name}-hf").iterdir()
        }
        folders[name] = (str(tmp_path / f"{name}-hf"), options["architecture"])
    bare_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    loaded = subprocess.run([sys.executable, "-c", LOAD_WITH_TRANSFORMERS, json.dumps(folders), TEXT],
                            env=bare_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    for name, (folder, _) in folders.items():
        ids = torch.from_numpy(np.load(f"{folder}/ids.npy"))
        model, tokenizer, _ = load_model(tmp_path / name)
        assert ids[0].tolist() == tokenizer.encode(TEXT, add_special_tokens=False).ids  # same tokenizer
        theirs = torch.from_numpy(np.load(f"{folder}/logits.npy"))
        torch.testing.assert_close(theirs, gristmill_logits(tmp_path / name, ids), rtol=0, atol=1e-4, msg=name)


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        (dict(architecture="decoder", position="alibi"), "position='alibi'"),
        (dict(architecture="decoder", sliding_window=8), "sliding_window=8"),
        (dict(architecture="decoder", objective="prefix_lm"), "objective prefix_lm"),
        (dict(architecture="encoder"), "position='rope'"),
        (dict(architecture="encoder", position="learned", mlp="gelu", norm="layernorm"), "norm_placement='pre'"),
        (dict(architecture="encoder_decoder", position="relative", bias=True), "bias=True"),
        (dict(architecture="encoder_decoder", position="relative", tie_weights=False), "tie_weights=False"),
    ],
)
def test_settings_without_an_equivalent_are_errors_naming_the_setting(tmp_path, shards, options, setting):
    train(TrainConfig(**TINY | options | dict(max_steps=2, warmup_steps=1)), shards, tmp_path / "run")
    with pytest.raises(NotExportable, match=rf"{setting.replace('(', '[(]')}"):
        export_hf(tmp_path / "run", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
