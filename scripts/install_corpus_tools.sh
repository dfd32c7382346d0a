#!/usr/bin/env bash
# Install what `caster data build` needs: Debian packages (speech synthesizers, recorded
# prompts, fortune cookies) and Python packages into .venv (text sources, decoders,
# transliteration). Idempotent: installed packages are left as they are.
# Needs root (or sudo) for apt; run from anywhere. docs/corpus.md says what each one is for.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    espeak-ng            # speech synthesis, 38 of the 40 locales (nearest voice for fr-CA, nn-NO)
    flite                # second English synthesizer (voices rms, kal16, slt, awb)
    fortunes fortunes-de fortunes-es fortunes-it fortunes-ru fortunes-pl fortunes-cs
    fortunes-bg fortunes-br
)
for lang in en es fr it ru; do
    # The -g722 package has the 16 kHz recordings; the plain one the transcripts (doc folder).
    APT_PACKAGES+=("asterisk-core-sounds-$lang" "asterisk-core-sounds-$lang-g722")
done

missing=()
for package in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
        missing+=("$package")
done
if ((${#missing[@]})); then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${missing[@]}"
fi

PYTHON="${PYTHON:-.venv/bin/python}"
# django: translation catalogs; gflanguages: UDHR samples; chatterbot-corpus: dialog lines;
# polib: .po parsing; num2words: digits in words; g722: Asterisk decoding; pykakasi and
# pypinyin: readings of Japanese and Chinese text for espeak-ng; tqdm: progress bar.
"$PYTHON" -m pip install -q django gflanguages chatterbot-corpus polib num2words g722 \
    pykakasi pypinyin tqdm
