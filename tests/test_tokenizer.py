"""Tokenizer: NeMo's hypothesis texts from the fixtures' token ids, and the punctuation rule."""

from __future__ import annotations

import functools
import io
import tarfile

import pytest
import sentencepiece
import yaml
from conftest import EN_MODEL, PROMPT_MODEL, nemo_path

from caster.tokenizer import Tokenizer, TokenizerError, vocabulary_punctuation


@functools.cache
def _nemo_tokenizer(model: str) -> Tokenizer:
    """The SentencePiece model a .nemo archive names in `tokenizer.model_path`."""
    with tarfile.open(nemo_path(model)) as tar:
        cfg = yaml.safe_load(tar.extractfile("./model_config.yaml").read())
        member = cfg["tokenizer"]["model_path"].removeprefix("nemo:")
        return Tokenizer(tar.extractfile(f"./{member}").read())


def _recorded_decodes(oracle, oracle_meta, model):
    """(token ids, NeMo's hypothesis text) for every greedy run recorded for `model`."""
    cases = []
    for wave, wmeta in oracle_meta["models"][model]["waveforms"].items():
        for ctx, cmeta in wmeta["contexts"].items():
            for run, rmeta in cmeta.items():
                cases.append((oracle[f"{model}/{wave}/{ctx}/{run}/tokens"], rmeta["text"]))
    return cases


@pytest.mark.parametrize("model", [EN_MODEL, PROMPT_MODEL])
def test_vocabulary_is_nemos(model, oracle_meta):
    meta = oracle_meta["models"][model]
    tok = _nemo_tokenizer(model)
    assert tok.pieces == meta["tokenizer"]["vocab"]
    assert tok.vocab_size == meta["tokenizer"]["vocab_size"] == 128
    assert tok.blank_id == meta["blank_id"] == 128
    assert tok.punctuation == {"."}


@pytest.mark.parametrize("model", [EN_MODEL, PROMPT_MODEL])
def test_decode_gives_nemos_texts(model, oracle, oracle_meta):
    tok = _nemo_tokenizer(model)
    cases = _recorded_decodes(oracle, oracle_meta, model)
    assert len(cases) >= 24  # 2 waves x 4 contexts x (offline, stream, pad_drop)
    texts = set()
    for ids, text in cases:
        assert tok.decode(ids) == text
        assert tok.decode([tok.blank_id, *ids.tolist(), tok.blank_id]) == text
        texts.add(text)
    if model == PROMPT_MODEL:
        assert texts == {
            "the speech model listens to the audio stream <en-US>",
            "wir sind noch nicht da ",
            "nous sommes dans la ville <fr-FR>",
            "a cache of frames for every chnk <en-US>",
        }
    else:
        assert texts == {"the speech model listens to the audio stream"}


def test_language_tags_of_the_fixtures():
    assert _nemo_tokenizer(EN_MODEL).language_tag_ids == {}
    tok = _nemo_tokenizer(PROMPT_MODEL)
    assert tok.language_tag_ids == {1: "en-US", 2: "de-DE", 3: "fr-FR"}
    assert tok.split_language_tags("nous sommes dans la ville <fr-FR>") == (
        "nous sommes dans la ville",
        ["fr-FR"],
    )
    assert tok.split_language_tags("wir sind noch nicht da ") == ("wir sind noch nicht da ", [])
    assert _nemo_tokenizer(EN_MODEL).split_language_tags("a <en-US> b") == ("a <en-US> b", [])


def test_vocabulary_punctuation_follows_nemos_special_piece_rule():
    pieces = ["<unk>", "<en-US>", "[laugh]", "##-", "▁¿", "▁", "  ", "'s", "a.", "b", "¡", "+"]
    # Not "-" (only in "<en-US>" and "##-"), "[" "]", "¿" (only "▁¿"); "+" is a symbol (Sm).
    assert vocabulary_punctuation(pieces) == {"'", ".", "¡"}


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    """A small BPE model trained in memory, with punctuation and NeMo-style tags."""
    corpus = [
        "Hello, world. How are you? I am fine!",
        "Que tal? Muy bien, gracias. Texas.",
        "The cat's hat [laugh] is red; the dog's is not.",
        "Texas. <en-US> The Columbia is lost. <en-US>",
        "Wir sind da. <de-DE> Ja!",
    ] * 20
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=80,
        model_type="bpe",
        character_coverage=1.0,
        hard_vocab_limit=False,
        user_defined_symbols=["<en-US>", "<de-DE>", "[laugh]"],
        bos_id=-1,
        eos_id=-1,
        minloglevel=2,
    )
    return Tokenizer(model.getvalue())


def _ids(tok: Tokenizer, *pieces: str) -> list[int]:
    return [tok.pieces.index(p) for p in pieces]


def test_trained_model_punctuation_and_tags(trained):
    assert trained.punctuation == {",", ".", "?", "!", "'", ";"}
    assert trained.language_tag_ids == {
        trained.pieces.index("<en-US>"): "en-US",
        trained.pieces.index("<de-DE>"): "de-DE",
    }


def test_one_space_before_punctuation_is_removed(trained):
    # decode_pieces gives "hello , world ." ; NeMo prints "hello, world."
    ids = trained.encode("hello , world .")
    assert trained.decode(ids) == "hello, world."
    # Only one whitespace character goes: two spaces before "." leave one.
    assert trained.decode(_ids(trained, "▁", "a", "▁", "▁", ".")) == "a ."
    # "<" is not punctuation, and the tag stays in the text as NeMo keeps it.
    text = "Texas. <en-US> The cat's hat [laugh] is red; Ja!"
    assert trained.decode(trained.encode(text)) == text
    assert trained.decode(trained.encode("a ; b ! <de-DE>")) == "a; b! <de-DE>"


def test_split_language_tags_tidies_whitespace(trained):
    split = trained.split_language_tags
    assert split("Texas. <en-US> The Columbia is lost. <en-US>") == (
        "Texas. The Columbia is lost.",
        ["en-US", "en-US"],
    )
    tags = ["de-DE", "en-US", "de-DE"]
    assert split("<de-DE> Ja! <en-US><de-DE>  Hello ") == ("Ja! Hello ", tags)
    assert split("<en-US>") == ("", ["en-US"])
    # Only this vocabulary's tags are tags.
    assert split("a <fr-FR> b") == ("a <fr-FR> b", [])


def test_blank_is_not_a_piece(trained):
    blank = trained.blank_id
    assert blank == trained.vocab_size
    assert trained.decode([blank, blank]) == ""
    with pytest.raises(TokenizerError, match="not a piece"):
        trained.id_to_piece(blank)
    with pytest.raises(TokenizerError, match="not a piece"):
        trained.decode([blank + 1])
    with pytest.raises(TokenizerError, match="not a piece"):
        trained.decode([-1])


@pytest.mark.parametrize("proto", [b"", b"not a sentencepiece model", b"\x00" * 16])
def test_garbage_model_bytes_raise(proto):
    with pytest.raises(TokenizerError):
        Tokenizer(proto)


def test_model_must_be_bytes():
    with pytest.raises(TokenizerError, match="bytes"):
        Tokenizer("tokenizer.model")
