"""Record what transformers itself computes with the converted tiny models.

Needs transformers (not a caster dependency); see README.md beside this file
for the environment. Writes `hf_outputs.npz`:

- `<model>/wave_a/encoded` (T, D) float32: `model.encoder(...)` on the HF
  feature extractor's features of oracle `inputs/wave_a`, at the default lookahead;
- `<model>/wave_a[/<language>]/tokens` (U,) int64: `model.generate(...)` with the
  blank steps removed; the prompt model once per language.

Usage: python make_hf_outputs.py --oracle ORACLE_NPZ --hf-dir DIR --out hf_outputs.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from transformers import AutoProcessor, Nemotron3_5AsrForRNNT, NemotronAsrStreamingForRNNT

WAVE = "wave_a"
MODELS = {
    "tiny_streaming_rnnt": (NemotronAsrStreamingForRNNT, [None]),
    "tiny_streaming_rnnt_prompt": (Nemotron3_5AsrForRNNT, ["en-US", "de-DE", "fr-FR", "auto"]),
}


def record(name: str, hf_dir: Path, wave: np.ndarray, out: dict[str, np.ndarray]) -> None:
    model_class, languages = MODELS[name]
    processor = AutoProcessor.from_pretrained(hf_dir / name)
    model = model_class.from_pretrained(hf_dir / name, dtype=torch.float32).eval()
    blank = model.config.blank_token_id
    with torch.no_grad():
        for language in languages:
            extra = {} if language is None else {"language": language}
            inputs = processor(wave, sampling_rate=16000, return_tensors="pt", **extra)
            if language in (None, languages[0]):
                encoded = model.encoder(
                    input_features=inputs["input_features"], attention_mask=inputs["attention_mask"]
                ).last_hidden_state
                out[f"{name}/{WAVE}/encoded"] = encoded[0].numpy()
            sequences = model.generate(**inputs).sequences[0].tolist()
            # HF returns one id per decoding step, blank steps included.
            tokens = np.array([t for t in sequences if t != blank], dtype=np.int64)
            key = f"{name}/{WAVE}" + ("" if language is None else f"/{language}")
            out[f"{key}/tokens"] = tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--oracle", type=Path, required=True, help="shared oracle.npz")
    parser.add_argument("--hf-dir", type=Path, required=True, help="folder of the HF model dirs")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    wave = np.load(args.oracle)[f"inputs/{WAVE}"]
    out: dict[str, np.ndarray] = {}
    for name in MODELS:
        record(name, args.hf_dir, wave, out)
    np.savez_compressed(args.out, **out)


if __name__ == "__main__":
    main()
