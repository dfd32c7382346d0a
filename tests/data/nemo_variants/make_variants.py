#!/usr/bin/env python
"""Build tiny NeMo cache-aware FastConformer-RNNT *variant* models and record NeMo's outputs.

The two models in ../shared/fixtures/nemo cover xscaling on/off, biases on/off, with and
without the language prompt, 128 mel bins, `layer_norm` in the conv module and a
128-piece vocabulary. The variants here cover the rest of what the family allows:
`batch_norm` in the conv module (with trained running statistics), 80 mel bins,
other `att_context_size` lists (one whose first entry is not the largest lookahead,
one whose left contexts differ), other vocabulary sizes, other conv kernel sizes and
subsampling factor 4. See README.md next to this file.

Run with NeMo 3.0.0 installed (never imported by caster or its tests):

    python make_variants.py --fixtures ../../../../shared/fixtures/nemo --out .

It reuses helpers of the fixtures' own generator `make_fixtures.py` (imported by
path from --fixtures) and takes the test waveforms from its `oracle.npz`. Nothing
here is NeMo source: it only calls NeMo. CPU, one thread, seeded: a rerun gives
identical arrays.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging as pylogging
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

SEED = 4321
TRAIN_STEPS = 200
WAVES = ("wave_a", "wave_b")
# Training targets of wave_a / wave_b in the fixtures' synthetic language.
TEXTS = {
    "wave_a": "the speech model listens to the audio stream",
    "wave_b": "wir sind noch nicht da",
}
PROMPT_LANGUAGES = ["en-US", "de-DE", "fr-FR", "auto"]
LANG_TAGS = ["<en-US>", "<de-DE>", "<fr-FR>"]
TEACHER_TARGETS = [5, 17, 3, 42, 99, 8]
TEACHER_FRAMES = 6
# Streaming steps whose returned caches are stored (first two and the last).
CACHE_STEPS = 2

VARIANTS = {
    # conv-module BatchNorm with running statistics, 80 mel bins, xscaling and biases on,
    # 256 pieces, lookaheads 7/1/0 at left 64.
    "variant_bn80": dict(
        prompt=False,
        vocab_size=256,
        n_mels=80,
        base=dict(
            d_model=48,
            n_layers=2,
            n_heads=4,
            conv_channels=32,
            pred_hidden=48,
            joint_hidden=48,
            att_context_sizes=[[64, 7], [64, 1], [64, 0]],
            xscaling=True,
            use_bias=True,
            untie_biases=True,
            prompt=False,
        ),
        encoder=dict(conv_norm_type="batch_norm", conv_kernel_size=9),
    ),
    # prompt model, conv kernel 5, xscaling off with biases on, 200 pieces (3 language
    # tags among them), a context list whose first entry is not the largest lookahead.
    "variant_prompt_k5": dict(
        prompt=True,
        vocab_size=200,
        n_mels=128,
        base=dict(
            d_model=48,
            n_layers=2,
            n_heads=4,
            conv_channels=32,
            pred_hidden=48,
            joint_hidden=40,
            att_context_sizes=[[48, 1], [48, 0], [48, 5]],
            xscaling=False,
            use_bias=True,
            untie_biases=True,
            prompt=True,
        ),
        encoder=dict(conv_norm_type="layer_norm", conv_kernel_size=5),
    ),
    # subsampling x4 (40 ms encoder frames), conv kernel 7, batch_norm, no biases,
    # no xscaling, 500 pieces, left contexts that differ between entries.
    "variant_sub4": dict(
        prompt=False,
        vocab_size=500,
        n_mels=128,
        base=dict(
            d_model=32,
            n_layers=2,
            n_heads=2,
            conv_channels=16,
            pred_hidden=32,
            joint_hidden=32,
            att_context_sizes=[[40, 4], [20, 1], [40, 0]],
            xscaling=False,
            use_bias=False,
            untie_biases=True,
            prompt=False,
        ),
        encoder=dict(conv_norm_type="batch_norm", conv_kernel_size=7, subsampling_factor=4),
    ),
}


def load_fixture_helpers(fixtures: str):
    """Import the fixtures' generator (make_fixtures.py) from its folder."""
    sys.path.insert(0, os.path.abspath(fixtures))
    import make_fixtures

    return make_fixtures


def train_tokenizer(mf, workdir: str, name: str, vocab_size: int, prompt: bool) -> str:
    """A SentencePiece BPE tokenizer from NeMo's create_spt_model on the fixtures' corpus.

    The build paths stored inside the model proto (corpus file, model prefix) are
    blanked so that the archive does not carry this machine's temp paths.
    """
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model
    from sentencepiece import sentencepiece_model_pb2

    corpus = os.path.join(workdir, f"{name}_corpus.txt")
    out_dir = os.path.join(workdir, f"{name}_tokenizer")
    mf.write_corpus(corpus, multilingual=True, seed=SEED)
    if not prompt:  # drop the language tags the multilingual corpus appends
        with open(corpus, encoding="utf-8") as f:
            lines = [line.rsplit(" <", 1)[0] for line in f.read().splitlines()]
        with open(corpus, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    create_spt_model(
        data_file=corpus,
        vocab_size=vocab_size,
        sample_size=-1,
        do_lower_case=False,
        tokenizer_type="bpe",
        output_dir=out_dir,
        user_defined_symbols=LANG_TAGS if prompt else None,
        remove_extra_whitespaces=True,
    )
    path = os.path.join(out_dir, "tokenizer.model")
    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    del proto.trainer_spec.input[:]
    proto.trainer_spec.model_prefix = ""
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
    return out_dir


def variant_config(mf, tokenizer_dir: str, spec: dict) -> dict:
    cfg = mf.base_config(tokenizer_dir, **spec["base"])
    cfg["preprocessor"]["features"] = spec["n_mels"]
    cfg["encoder"]["feat_in"] = spec["n_mels"]
    cfg["encoder"].update(spec["encoder"])
    if spec["prompt"]:
        cfg["model_defaults"].update(
            initialize_prompt_feature=True,
            num_prompts=128,
            prompt_dictionary=dict(mf.ML_PROMPT_DICTIONARY),
        )
    return cfg


def training_utterances(mf, waves: dict, prompt: bool) -> list:
    """(waveform, text, prompt id) for the short training run; wave_a comes first."""
    ids = mf.ML_PROMPT_DICTIONARY
    if prompt:
        utts = [
            (waves["wave_a"], TEXTS["wave_a"] + " <en-US>", ids["en-US"]),
            (waves["wave_b"], TEXTS["wave_b"] + " <de-DE>", ids["de-DE"]),
        ]
        return utts + [
            (mf.render_text(t, sd), f"{t} <{lang}>", ids[lang]) for t, sd, lang in mf.TRAIN_EXTRA_ML
        ]
    utts = [(waves["wave_a"], TEXTS["wave_a"], None)]
    return utts + [(mf.render_text(t, sd), t, None) for t, sd in mf.TRAIN_EXTRA_EN]


def batch_norm_stats(model) -> dict:
    """Summary of the conv-module BatchNorm running statistics (must be far from 0 / 1)."""
    out = {}
    for name, module in model.encoder.named_modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            mean, var = module.running_mean, module.running_var
            out[name] = {
                "running_mean_abs_max": float(mean.abs().max()),
                "running_var_min": float(var.min()),
                "running_var_max": float(var.max()),
                "num_batches_tracked": int(module.num_batches_tracked),
            }
    return out


def tag(context) -> str:
    return f"ctx{context[0]}_{context[1]}"


def store_stream(mf, arrays, prefix, res, *, encoded: bool, caches: bool) -> dict:
    steps = res["steps"]
    valid = [int(s["encoded_len"][0]) for s in steps]
    arrays[f"{prefix}/chunk_schedule"] = np.array(res["schedule"], dtype=np.int64)
    arrays[f"{prefix}/encoded_len"] = np.array(valid, dtype=np.int64)
    arrays[f"{prefix}/keep_all_outputs"] = np.array([bool(s["keep_all_outputs"]) for s in steps])
    if encoded:
        arrays[f"{prefix}/encoded_concat"] = np.concatenate(
            [mf.np32(s["encoded"][0, :, :v]).T for s, v in zip(steps, valid, strict=True)]
        )  # (sum valid, D)
    arrays[f"{prefix}/cache_last_channel_len"] = np.array(
        [int(s["cache_last_channel_len"][0]) for s in steps], dtype=np.int64
    )
    if caches:
        stored = sorted(set(range(min(CACHE_STEPS, len(steps)))) | {len(steps) - 1})
        arrays[f"{prefix}/cache_steps_stored"] = np.array(stored, dtype=np.int64)
        for i in stored:
            arrays[f"{prefix}/cache_last_channel/step{i}"] = mf.np32(
                steps[i]["cache_last_channel"][:, 0]
            )  # (L, left, D)
            arrays[f"{prefix}/cache_last_time/step{i}"] = mf.np32(
                steps[i]["cache_last_time"][:, 0]
            )  # (L, D, k-1)
    arrays[f"{prefix}/tokens"] = np.array(res["tokens"], dtype=np.int64)
    if res["timestamps"] is not None:
        arrays[f"{prefix}/token_frames"] = np.array(res["timestamps"], dtype=np.int64)
    return {
        "n_steps": len(steps),
        "text": res["text"],
        "inputs_rebuilt_from_schedule": bool(all(s[4] for s in res["schedule"])),
    }


def record(mf, name: str, spec: dict, model, waves: dict, arrays: dict) -> dict:
    """Record NeMo's outputs of the restored model for both waveforms and every context."""
    prompt = spec["prompt"]
    model.eval()
    mf.set_greedy_batch(model)
    enc = model.encoder
    contexts = [list(c) for c in enc.att_context_size_all]
    ids = mf.ML_PROMPT_DICTIONARY
    languages = PROMPT_LANGUAGES if prompt else [None]
    meta = {"streaming_cfg": {}, "texts": {}, "stream_vs_offline": {}}
    for wave_name in WAVES:
        wav = waves[wave_name]
        x = torch.from_numpy(wav)[None]
        xl = torch.tensor([wav.shape[0]])
        with torch.inference_mode():
            feats, feat_len = model.preprocessor(input_signal=x, length=xl)
        base = f"{name}/{wave_name}"
        # Variants with the same front end share one copy of the features (keyed by mel count).
        mel_key = f"features/mel{feats.shape[1]}/{wave_name}"
        if mel_key in arrays and not np.array_equal(arrays[mel_key], mf.np32(feats[0])):
            raise RuntimeError(f"{name}: features differ from another variant's {mel_key}")
        arrays[mel_key] = mf.np32(feats[0])  # (F, n//160 + 1)
        arrays[f"{mel_key}_len"] = mf.npi(feat_len)
        for index, context in enumerate(contexts):
            enc.set_default_att_context_size(context)
            meta["streaming_cfg"][tag(context)] = mf.streaming_cfg_dict(enc)
            with torch.inference_mode():
                encoded, encoded_len = enc(audio_signal=feats, length=feat_len)  # (B, D, T)
            p = f"{base}/{tag(context)}"
            # Valid frames only: at subsampling x4, wave_b's n//160 + 1 feature columns give one
            # encoder frame more than its valid length (65 vs 64).
            valid = int(encoded_len[0])
            arrays[f"{p}/offline/encoded"] = mf.np32(encoded[0, :, :valid]).T  # (T, D)
            arrays[f"{p}/offline/encoded_len"] = mf.npi(encoded_len)
            for language in languages:
                sub = f"/{language}" if language else ""
                with torch.inference_mode():
                    if language:
                        prompted, prompted_len = model.forward(
                            input_signal=x,
                            input_signal_length=xl,
                            prompt_indices=torch.tensor([ids[language]]),
                        )
                        arrays[f"{p}/offline{sub}/encoded_after_prompt"] = mf.np32(
                            prompted[0, :, :valid]
                        ).T
                    else:
                        prompted, prompted_len = encoded, encoded_len
                    hyp = model.decoding.rnnt_decoder_predictions_tensor(
                        encoder_output=prompted,
                        encoded_lengths=prompted_len,
                        return_hypotheses=True,
                    )[0]
                tokens = mf.hyp_tokens(hyp)
                arrays[f"{p}/offline{sub}/tokens"] = np.array(tokens, dtype=np.int64)
                arrays[f"{p}/offline{sub}/token_frames"] = np.array(
                    mf.hyp_timestamps(hyp), dtype=np.int64
                )
                meta["texts"][f"{p}/offline{sub}"] = hyp.text
                # NeMo's cache-aware streaming (the example script's loop); the encoder part does
                # not depend on the prompt, so encoder outputs are stored for the first language.
                if language:
                    model.set_inference_prompt(language)
                res = mf.run_streaming(model, wav)
                if language:
                    del model._inference_prompt_index
                first_language = language == languages[0]
                info = store_stream(
                    mf,
                    arrays,
                    f"{p}/stream{sub}",
                    res,
                    encoded=first_language,
                    caches=first_language and index == 0,
                )
                info["tokens_equal_offline"] = res["tokens"] == tokens
                if first_language:
                    off = arrays[f"{p}/offline/encoded"]
                    got = arrays[f"{p}/stream{sub}/encoded_concat"]
                    n = min(off.shape[0], got.shape[0])
                    info["frames_offline_stream"] = [off.shape[0], got.shape[0]]
                    info["max_abs_diff_common_frames"] = float(np.abs(off[:n] - got[:n]).max())
                meta["stream_vs_offline"][f"{p}/stream{sub}"] = info
        enc.set_default_att_context_size(contexts[0])

    # Teacher-forced prediction network and joint on the first frames of wave_a.
    wav = waves["wave_a"]
    x, xl = torch.from_numpy(wav)[None], torch.tensor([wav.shape[0]])
    targets = torch.tensor([TEACHER_TARGETS])
    with torch.inference_mode():
        kwargs = {"prompt_indices": torch.tensor([ids["en-US"]])} if prompt else {}
        encoded, _ = model.forward(input_signal=x, input_signal_length=xl, **kwargs)
        dec_out, _, _ = model.decoder(targets=targets, target_length=torch.tensor([6]))
        joint = model.joint.joint(
            encoded.transpose(1, 2)[:, :TEACHER_FRAMES], dec_out.transpose(1, 2)
        )  # (B, T, U+1, V+1): log-softmax on CPU
    arrays[f"{name}/teacher_forced/targets"] = mf.npi(targets[0])
    arrays[f"{name}/teacher_forced/decoder_out"] = mf.np32(dec_out[0]).T  # (U+1, H)
    arrays[f"{name}/teacher_forced/joint_logprobs"] = mf.np32(joint[0])
    return meta


def build_variant(mf, name: str, spec: dict, waves: dict, work: str, out: str, steps: int):
    import nemo.collections.asr as nemo_asr
    from nemo.collections.asr.models import EncDecRNNTBPEModel
    from nemo.collections.asr.models.rnnt_bpe_models_prompt import EncDecRNNTBPEModelWithPrompt
    from omegaconf import OmegaConf

    mf.seed_everything(SEED)
    tok_dir = train_tokenizer(mf, work, name, spec["vocab_size"], spec["prompt"])
    cfg = OmegaConf.create(variant_config(mf, tok_dir, spec))
    cls = EncDecRNNTBPEModelWithPrompt if spec["prompt"] else EncDecRNNTBPEModel
    mf.seed_everything(SEED)
    model = cls(cfg=cfg)
    perturbed = mf.perturb_constant_params(model, SEED + 1)
    utts = training_utterances(mf, waves, spec["prompt"])
    mf.seed_everything(SEED + 2)
    t0 = time.time()
    losses = mf.train_briefly(model, utts, spec["prompt"], steps=steps)
    seconds = time.time() - t0
    model.eval()
    calib = mf.calibrate_blank_shift(model, utts[0][0], utts[0][1], utts[0][2])
    mf.set_greedy_batch(model)
    path = os.path.join(out, f"{name}.nemo")
    model.save_to(path)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    restored = nemo_asr.models.ASRModel.restore_from(restore_path=path, map_location="cpu")
    restored.eval()
    rsd = restored.state_dict()
    identical = set(rsd) == set(saved) and all(torch.equal(rsd[k], saved[k]) for k in rsd)
    if not identical:
        raise RuntimeError(f"{name}: restored state_dict differs from the saved one")
    if spec["prompt"] and not hasattr(restored, "prompt_kernel"):
        raise RuntimeError(f"{name}: restored prompt model has no prompt_kernel")
    meta = {
        "class": type(restored).__name__,
        "n_parameters": int(sum(p.numel() for p in restored.parameters())),
        "vocab_size": int(restored.tokenizer.vocab_size),
        "att_context_sizes": [list(c) for c in restored.encoder.att_context_size_all],
        "encoder": {k: OmegaConf.to_container(restored.cfg.encoder)[k] for k in ENCODER_KEYS},
        "n_mels": int(restored.cfg.preprocessor.features),
        "training": {
            "steps": steps,
            "utterances": [u[1] for u in utts],
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "seconds": round(seconds, 1),
        },
        "constant_params_perturbed": len(perturbed),
        "blank_logit_calibration": calib,
        "batch_norm_running_stats": batch_norm_stats(restored),
        "bytes": os.path.getsize(path),
    }
    return restored, meta


ENCODER_KEYS = (
    "n_layers",
    "d_model",
    "n_heads",
    "subsampling_factor",
    "subsampling_conv_channels",
    "conv_kernel_size",
    "conv_norm_type",
    "xscaling",
    "use_bias",
    "att_context_size",
)


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--fixtures",
        default=os.path.join(here, "..", "..", "..", "..", "shared", "fixtures", "nemo"),
        help="folder with make_fixtures.py and oracle.npz",
    )
    ap.add_argument("--out", default=here, help="output folder")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--train-steps", type=int, default=TRAIN_STEPS)
    args = ap.parse_args()

    torch.set_num_threads(1)
    from nemo.utils import logging as nemo_logging

    nemo_logging.setLevel(pylogging.ERROR)
    import nemo

    mf = load_fixture_helpers(args.fixtures)
    fixture_oracle = np.load(os.path.join(args.fixtures, "oracle.npz"))
    waves = {w: fixture_oracle[f"inputs/{w}"] for w in WAVES}
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    # The waveforms are copied so that the tests need nothing outside this folder.
    arrays: dict[str, np.ndarray] = {f"inputs/{w}": waves[w] for w in WAVES}
    meta = {
        "generator": "make_variants.py",
        "versions": {
            "nemo_toolkit": nemo.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": sys.version.split()[0],
        },
        "seed": SEED,
        "inputs": "inputs/wave_a and inputs/wave_b: copied from the fixtures' oracle.npz",
        "teacher_forced": {"targets": TEACHER_TARGETS, "frames": TEACHER_FRAMES, "wave": "wave_a"},
        "models": {},
    }
    work = tempfile.mkdtemp(prefix="variants_work_")
    t0 = time.time()
    try:
        for name in args.variants:
            spec = copy.deepcopy(VARIANTS[name])
            model, mmeta = build_variant(mf, name, spec, waves, work, out, args.train_steps)
            mmeta.update(record(mf, name, spec, model, waves, arrays))
            meta["models"][name] = mmeta
            print(name, json.dumps({k: mmeta[k] for k in ("n_parameters", "bytes")}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    npz = os.path.join(out, "oracle.npz")
    np.savez_compressed(npz, **arrays)
    meta["arrays"] = {k: [list(v.shape), str(v.dtype)] for k, v in sorted(arrays.items())}
    meta["npz_bytes"] = os.path.getsize(npz)
    meta["elapsed_s"] = round(time.time() - t0, 1)
    with open(os.path.join(out, "oracle.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {out} in {meta['elapsed_s']} s, oracle.npz {meta['npz_bytes']} bytes")


if __name__ == "__main__":
    main()
