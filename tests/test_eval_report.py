"""bench/eval_corpus.py on a tiny corpus-like folder and a NeMo-built fixture model."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import soundfile as sf
from conftest import PROMPT_MODEL, ROOT, nemo_path

SAMPLE_RATE = 16000
# (locale, voice) per test line; the prompt fixture's dictionary has en-US and de-DE.
LINES = {
    "en-US": [
        ("espeak:en-us+m4:p35:s140", "Hello there."),
        ("asterisk:digits/1", "One."),
        ("flite:slt:p50:s100", "Good morning."),
        ("espeak:en-us+f3:p55:s160", "See you later."),
        ("asterisk:vm-goodbye", "Goodbye."),
    ],
    "de-DE": [
        ("espeak:de+m7:p65:s180", "Guten Tag."),
        ("asterisk:digits/2", "Zwei."),
        ("espeak:de+f5:p35:s140", "Danke schön."),
    ],
}


@pytest.fixture(scope="module")
def report_script(request):
    """The script as a module; bench/ goes on sys.path since it imports bench_streaming."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    request.addfinalizer(monkeypatch.undo)
    return importlib.import_module("eval_corpus")


def write_corpus(root) -> dict[str, set[str]]:
    """OUT/test/<locale>.jsonl and OUT/audio/<locale>/test/*.flac as `caster data build`
    lays them out; returns each set's expected audio paths, relative to the corpus."""
    rng = np.random.default_rng(0)
    (root / "test").mkdir(parents=True)
    expected: dict[str, set[str]] = {"synthetic": set(), "asterisk": set()}
    for locale, lines in LINES.items():
        audio_dir = root / "audio" / locale / "test"
        audio_dir.mkdir(parents=True)
        records, synthetic = [], 0
        for i, (voice, text) in enumerate(lines):
            t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
            audio = 0.1 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(t.size)
            sf.write(audio_dir / f"{i:02d}.flac", audio.astype(np.float32), SAMPLE_RATE)
            relative = f"audio/{locale}/test/{i:02d}.flac"
            if voice.startswith("asterisk:"):
                expected["asterisk"].add(relative)
            elif synthetic < 2:  # --per-locale 2: the first two in manifest order
                synthetic += 1
                expected["synthetic"].add(relative)
            records.append(
                {
                    "audio_filepath": f"../{relative}",
                    "duration": 1.0,
                    "text": text,
                    "lang": locale,
                    "source": "asterisk" if voice.startswith("asterisk:") else "fortunes",
                    "voice": voice,
                }
            )
        lines_text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (root / "test" / f"{locale}.jsonl").write_text(lines_text)
    return expected


def test_eval_report_writes_json_md_png(report_script, tmp_path):
    corpus = tmp_path / "corpus"
    expected = write_corpus(corpus)
    out = tmp_path / "report" / "eval"
    argv = ["--model", str(nemo_path(PROMPT_MODEL)), "--corpus", str(corpus)]
    argv += ["--per-locale", "2", "--out", str(out)]
    assert report_script.main(argv) == 0

    report = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    markdown = out.with_suffix(".md").read_text()
    assert "## Targets (issue #6)" in markdown and "## Asterisk test set" in markdown

    sets = report["sets"]
    for name, paths in expected.items():
        assert set(sets[name]["entries"]) == paths, name
    assert sets["asterisk"]["utterances"] == {"de-DE": 1, "en-US": 2}
    assert sets["synthetic"]["available"] == {"de-DE": 2, "en-US": 3}

    names = [t["name"] for t in report["targets"]]
    assert names == ["asterisk WER", "synthetic CER", "auto language identification"]
    for target in report["targets"]:
        assert target["status"] in ("met", "missed")
        assert target["value"] >= 0.0
    assert set(report["targets"][-1]["per_locale"]) == {"de-DE", "en-US"}

    for part in sets.values():
        # every chunk size, both prompts, each locale and pooled
        assert {"160ms/en-US/wer", "560ms/auto/de-DE/wer", "1120ms/all/wer"} <= set(
            part["error_rates"]
        )
        assert all(rate >= 0.0 for rate in part["error_rates"].values())
        assert all(rate >= 0.0 for rate in part["cer"].values())
        assert part["lid"] and all(0.0 <= rate <= 1.0 for rate in part["lid"].values())
        assert "560ms/macro/cer" in part["macro"]
        assert [p["chunk_ms"] for p in part["passes"]] == [160, 560, 1120]
        assert all(p["rtf"] > 0 and p["audio_seconds"] > 0 for p in part["passes"])


def test_eval_report_rejects_bad_corpus(report_script, tmp_path, capsys):
    model = ["--model", str(nemo_path(PROMPT_MODEL))]
    assert report_script.main([*model, "--corpus", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty" / "test").mkdir(parents=True)
    assert report_script.main([*model, "--corpus", str(tmp_path / "empty")]) == 2
    assert "no test manifests" in capsys.readouterr().err
