"""Parity figures against NeMo's own outputs (../shared/fixtures/nemo), per fixture and context.

Prints a markdown table and writes bench/results/parity.md. The assertions live in
tests/test_model.py; this only reports the numbers.

    python bench/parity.py [--fixtures ../shared/fixtures/nemo]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import caster
from caster.decoding import greedy_decode, initial_decoder_state

ROOT = Path(__file__).resolve().parent.parent


def err(a: torch.Tensor, b: np.ndarray) -> float:
    return float(np.abs(a.numpy() - b).max())


def nemo_schedule_error(net, oracle: dict, base: str, mel: torch.Tensor, context) -> float:
    """caster's streaming step fed exactly the frames NeMo's buffer fed it, chunk by chunk.

    NeMo's 80 ms zero-filled pre-encode cache is handed over as it is, so this
    compares the step itself (tests/test_model.py asserts the same).
    """
    cache = net.encoder.initial_cache(1, context)
    outputs = []
    for start, n_cache, n_zero, n_new, _ in oracle[f"{base}/chunk_schedule"].tolist():
        if n_zero:
            zeros = torch.zeros(mel.shape[0], n_zero)
            history = torch.cat([zeros, mel[:, start - n_cache : start]], 1)[None]
            cache = replace(cache, mel=history, mel_len=torch.tensor([n_zero + n_cache]))
        chunk = mel[None, :, start : start + n_new]
        out, out_len, cache = net.encoder.step(chunk, torch.tensor([n_new]), cache, context)
        outputs.append(out[0, : int(out_len[0])])
    return err(torch.cat(outputs), oracle[f"{base}/encoded_concat"])


@torch.inference_mode()
def report_model(fixtures: Path, oracle: dict, name: str) -> list[str]:
    model = caster.load(fixtures / f"{name}.nemo")
    net = model.net
    prompt_language = "en-US" if model.config.prompt else None
    rows = []
    for wave in ("wave_a", "wave_b"):
        audio = torch.from_numpy(oracle[f"inputs/{wave}"])[None]
        mel, mel_len = net.preprocessor(audio, torch.tensor([audio.shape[1]]))
        feat_err = err(mel[0], oracle[f"{name}/{wave}/features"])
        nemo_mel = torch.from_numpy(oracle[f"{name}/{wave}/features"])[None]
        for context in model.config.encoder.att_context_size:
            tag = f"ctx{context[0]}_{context[1]}"
            base = f"{name}/{wave}/{tag}"
            offline, offline_len = net.encoder(nemo_mel, mel_len, context)
            own, _ = net.encoder(mel, mel_len, context)
            ref = oracle[f"{base}/offline/encoded"]
            chunk_ms = (context[1] + 1) * 80
            languages = [None] if prompt_language is None else ["en-US", "de-DE", "fr-FR", "auto"]
            tokens_ok, stream_ok = True, True
            for language in languages:
                key = f"{base}/offline" + (f"/{language}" if language else "")
                prompt = None if language is None else torch.tensor([model.prompt_index(language)])
                hyps, _ = greedy_decode(
                    net,
                    net.apply_prompt(offline, prompt),
                    offline_len,
                    initial_decoder_state(net, 1),
                )
                tokens_ok &= hyps[0].token_ids == oracle[f"{key}/tokens"].tolist()
                stream = model.stream(language=language, chunk_ms=chunk_ms)
                stream.feed(oracle[f"inputs/{wave}"])
                stream_ok &= stream.finish().token_ids == oracle[f"{key}/tokens"].tolist()
            stream_base = f"{base}/stream" + (f"/{prompt_language}" if prompt_language else "")
            chunk_err = nemo_schedule_error(net, oracle, stream_base, nemo_mel[0], context)
            rows.append(
                f"| {name} | {wave} | {context} | {feat_err:.1e} | {err(offline[0], ref):.1e} | "
                f"{chunk_err:.1e} | "
                f"{err(own[0], ref):.1e} | {'yes' if tokens_ok else 'NO'} | "
                f"{'yes' if stream_ok else 'NO'} |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", type=Path, default=ROOT.parent / "shared/fixtures/nemo")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/parity.md")
    args = parser.parse_args()
    z = np.load(args.fixtures / "oracle.npz")
    oracle = {k: z[k] for k in z.files}
    lines = [
        "# Parity with NeMo 3.0.0 (max abs error; tokens: identical to NeMo's greedy ids)",
        "",
        "features: caster's log-mel vs NeMo's (see tests/test_mel.py on quiet-band FFT rounding);",
        "encoder (NeMo mel): caster's offline encoder on NeMo's features; per-chunk stream:",
        "caster's streaming step on the frames NeMo's buffer fed each step, vs NeMo's per-chunk",
        "outputs; encoder (own mel): on",
        "caster's features from the waveform; stream tokens: caster's `Stream` at that context",
        "(all prompt languages for the prompt model) vs NeMo's offline tokens.",
        "",
        "| fixture | wave | context | features | encoder (NeMo mel) | per-chunk stream | "
        "encoder (own mel) | tokens | stream tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("tiny_streaming_rnnt", "tiny_streaming_rnnt_prompt"):
        lines += report_model(args.fixtures, oracle, name)
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
