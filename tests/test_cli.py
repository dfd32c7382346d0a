"""The command line, in-process through `caster.cli.main` (and once as `python -m caster`)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import srt
import webvtt
from conftest import EN_MODEL, PROMPT_MODEL, ROOT, nemo_path

import caster
from caster.cli import main


@pytest.fixture(scope="module")
def wavs(oracle, tmp_path_factory):
    folder = tmp_path_factory.mktemp("audio")
    a, b = oracle["inputs/wave_a"], oracle["inputs/wave_b"]
    paths = {"a": folder / "a.wav", "b": folder / "b.flac", "long": folder / "long.wav"}
    sf.write(paths["a"], a, 16000)
    sf.write(paths["b"], b, 16000)
    sf.write(paths["long"], np.concatenate([a, b, a]), 16000)
    (folder / "sub").mkdir()
    sf.write(folder / "sub" / "a.wav", b, 16000)  # same stem as a.wav
    paths["sub_a"] = folder / "sub" / "a.wav"
    (folder / "bad.wav").write_bytes(b"RIFF....WAVEjunk")
    paths["bad"] = folder / "bad.wav"
    return paths


@pytest.fixture(scope="module")
def en_model():
    return caster.load(nemo_path(EN_MODEL))


def run(capsys, *argv: object) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_transcribe_text_json_and_failures(capsys, wavs, en_model):
    model = str(nemo_path(EN_MODEL))
    status, out, err = run(capsys, "transcribe", "--model", model, wavs["a"])
    assert status == 0 and out == en_model.transcribe(wavs["a"]).text.strip() + "\n"
    # Several files: one "path<TAB>text" line each, in order; a bad file is reported, not fatal.
    files = [wavs["long"], wavs["bad"], wavs["a"], wavs["b"]]
    status, out, err = run(
        capsys, "transcribe", "--model", model, "--long-audio-seconds", "5", *files
    )
    assert status == 1 and "bad.wav" in err
    expected = [f"{p}\t{en_model.transcribe(p).text.strip()}" for p in files if p != wavs["bad"]]
    assert out.splitlines() == expected
    status, out, _ = run(capsys, "transcribe", "--model", model, "--format", "json", *files[2:])
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["file"] for r in records] == [str(p) for p in files[2:]]
    assert records[0]["segments"][0]["words"]


def test_transcribe_subtitles_to_a_folder(capsys, wavs, tmp_path):
    model = str(nemo_path(PROMPT_MODEL))
    argv = ["transcribe", "--model", model, "--language", "en-US", "--chunk-ms", "80"]
    status, out, _ = run(capsys, *argv, "--format", "srt", "--output-dir", tmp_path, wavs["a"],
                         wavs["sub_a"], wavs["b"])  # fmt: skip
    assert status == 0 and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-2.srt", "a.srt", "b.srt"]
    for path in tmp_path.iterdir():
        assert list(srt.parse(path.read_text()))
    status, _, _ = run(capsys, *argv, "--format", "vtt", "--output-dir", tmp_path, wavs["b"])
    captions = webvtt.read(str(tmp_path / "b.vtt"))
    assert status == 0 and len(captions) >= 1


def test_transcribe_manifest(capsys, wavs, tmp_path):
    manifest = tmp_path / "test.jsonl"
    manifest.write_text(
        "\n".join(
            [
                json.dumps(
                    {"audio_filepath": str(wavs["a"]), "text": "the speech", "lang": "en-US"}
                ),
                json.dumps({"audio_filepath": "missing.wav", "text": "x"}),
                "oops",
                json.dumps({"audio_filepath": str(wavs["b"]), "lang": "de-DE"}),
            ]
        )
    )
    out_dir = tmp_path / "out"
    model = str(nemo_path(PROMPT_MODEL))
    argv = ["transcribe", "--model", model, "--manifest", manifest, "--output-dir", out_dir]
    status, out, err = run(capsys, *argv)
    assert status == 1  # some entries were skipped
    assert "skipped 2 of 4 manifest entries" in err and "test.jsonl:3" in err
    records = [json.loads(x) for x in (out_dir / "test.pred.jsonl").read_text().splitlines()]
    assert [r["audio_filepath"] for r in records] == [str(wavs["a"]), str(wavs["b"])]
    assert all("pred_text" in r for r in records) and records[1]["pred_lang"] == "de-DE"
    rates = json.loads((out_dir / "test.wer.json").read_text())
    assert {(r["language"], r["metric"]) for r in rates} == {("en-US", "wer"), ("all", "wer")}
    assert "all" in err and "wer" in err  # the table
    # Without --output-dir the manifest goes to stdout.
    status, out, _ = run(capsys, "transcribe", "--model", model, "--manifest", manifest)
    assert [json.loads(x)["pred_text"] for x in out.splitlines()] == [
        r["pred_text"] for r in records
    ]


def test_usage_errors(capsys, wavs, tmp_path):
    model = str(nemo_path(EN_MODEL))
    cases = [
        ["transcribe", "--model", model],  # neither files nor manifest
        ["transcribe", "--model", model, "--manifest", tmp_path / "m.jsonl", wavs["a"]],
        ["transcribe", "--model", model, "--format", "vtt", wavs["a"], wavs["b"]],
        ["transcribe", "--model", tmp_path / "nothing.nemo", wavs["a"]],
        ["transcribe", "--model", model, "--chunk-ms", "123", wavs["a"]],
        ["transcribe", "--model", model, "--manifest", tmp_path / "m.jsonl"],  # missing
        ["transcribe", "--model", model, "--manifest", wavs["a"], "--language", "xx"],
        ["stream", "--model", model, "--language", "de-DE", wavs["a"]],  # no prompt
        ["bench", "no-such-benchmark"],
    ]
    for argv in cases:
        status, _, err = run(capsys, *argv)
        assert status == 2 and err.startswith("caster: "), argv


def final_lines(out: str) -> list[str]:
    return [line.split("] ", 1)[1] for line in out.splitlines() if line.startswith("[")]


def test_stream_file_and_stdin(capsys, monkeypatch, wavs, oracle, en_model):
    model = str(nemo_path(EN_MODEL))
    expected = en_model.transcribe(wavs["a"]).text.replace(" ", "")
    status, out, _ = run(capsys, "stream", "--model", model, wavs["a"])
    assert status == 0
    assert any(line.startswith("… ") for line in out.splitlines())  # interim results
    # Final segments hold every token (a cut may fall inside a word).
    assert "".join(final_lines(out)).replace(" ", "") == expected
    pcm = (np.clip(oracle["inputs/wave_a"], -1, 1) * 32767).astype("<i2").tobytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(pcm + b"\x01")))
    status, out2, _ = run(capsys, "stream", "--model", model, "--final-only", "-")
    assert status == 0 and "… " not in out2 and final_lines(out2)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\x00\x00\xc0\x7f" * 400)))
    status, _, err = run(capsys, "stream", "--model", model, "--encoding", "float32", "-")
    assert status == 2 and "NaN" in err


def test_help_lists_every_command(capsys):
    commands = ["transcribe", "stream", "bench", "train", "eval"]
    for name in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("usage: caster")
    done = subprocess.run(
        [sys.executable, "-m", "caster", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    for name in commands:
        assert name in done.stdout
