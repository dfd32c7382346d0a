"""The CPU speed paths: fused attention, cached position tables, active-row greedy
decoding (all exact), and the int8 quantized model (approximate, bounded here)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPT_MODEL, nemo_path

import caster
from caster.config import DecoderConfig, EncoderConfig, ModelConfig
from caster.decoding import greedy_decode, initial_decoder_state
from caster.encoder import PointwiseConv1d, RelPositionMultiHeadAttention, relative_positions
from caster.quantize import Int8Linear, Int8LSTM, QuantizationError, quantize_transducer
from caster.state import select_state, stack_states
from caster.transducer import Transducer

SMALL = ModelConfig(
    encoder=EncoderConfig(
        n_layers=2,
        d_model=64,
        n_heads=4,
        subsampling_conv_channels=16,
        dropout=0.0,
        dropout_pre_encoder=0.0,
        dropout_att=0.0,
        att_context_size=((8, 1),),
    ),
    decoder=DecoderConfig(vocab_size=40, pred_hidden=32, joint_hidden=32, dropout=0.0),
)


def nemo_attention(att: RelPositionMultiHeadAttention, query, keys, pos_emb, mask):
    """NeMo's formula written out: scores masked_fill(-10000), softmax, masked_fill(0)."""
    b, t, _ = query.shape
    k_len, h, dh = keys.shape[1], att.n_heads, att.d_head
    q = att.linear_q(query).view(b, t, h, dh)
    k = att.linear_k(keys).view(b, k_len, h, dh).transpose(1, 2)
    v = att.linear_v(keys).view(b, k_len, h, dh).transpose(1, 2)
    p = att.linear_pos(pos_emb).view(1, -1, h, dh).transpose(1, 2)
    content = (q + att.pos_bias_u).transpose(1, 2) @ k.transpose(-2, -1)
    position = (q + att.pos_bias_v).transpose(1, 2) @ p.transpose(-2, -1)
    position = F.pad(position, (1, 0)).view(b, h, -1, t)[:, :, 1:].reshape(b, h, t, -1)
    scores = (content + position[..., :k_len]) / math.sqrt(dh)
    hidden = mask[:, None]
    attn = torch.softmax(scores.masked_fill(hidden, -10000.0), -1).masked_fill(hidden, 0.0)
    return att.linear_out((attn @ v).transpose(1, 2).reshape(b, t, h * dh))


def test_fused_attention_equals_nemo_formula_with_fully_masked_rows():
    torch.manual_seed(0)
    att = RelPositionMultiHeadAttention(SMALL.encoder).eval()
    with torch.no_grad():
        att.pos_bias_u.normal_()
        att.pos_bias_v.normal_()
    with torch.inference_mode():
        _check_attention(att)


def _check_attention(att: RelPositionMultiHeadAttention) -> None:
    b, t, cached = 3, 4, 6
    query = torch.randn(b, t, 64)
    keys = torch.cat([torch.randn(b, cached, 64), query], dim=1)
    pos_emb = relative_positions(cached + t, 64, torch.device("cpu"))
    mask = torch.rand(b, t, cached + t) < 0.4
    mask[1, 2] = True  # a padded query: sees nothing, must give linear_out(0)
    mask[2] = True
    got = att(query, keys, pos_emb, mask)
    want = nemo_attention(att, query, keys, pos_emb, mask)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got[2], att.linear_out(torch.zeros(t, 64)), atol=1e-6)
    assert not got.isnan().any()


def test_position_tables_are_cached_and_follow_weight_changes():
    torch.manual_seed(1)
    att = RelPositionMultiHeadAttention(SMALL.encoder).eval()
    pos_emb = relative_positions(9, 64, torch.device("cpu"))
    with torch.inference_mode():
        first = att.projected_positions(pos_emb)
        assert att.projected_positions(pos_emb) is first  # served from the cache
        want = att.linear_pos(pos_emb)[0].view(17, 4, 16).permute(1, 2, 0)
        assert torch.allclose(first, want)
    with torch.no_grad():
        att.linear_pos.weight.mul_(2.0)  # an in-place edit bumps the weight's version
    with torch.inference_mode():
        assert torch.allclose(att.projected_positions(pos_emb), 2 * first, atol=1e-6)
        for n in range(2, 2 + 2 * att.POSITION_CACHE_ENTRIES):  # bounded
            att.projected_positions(relative_positions(n, 64, torch.device("cpu")))
    assert len(att._position_cache) == att.POSITION_CACHE_ENTRIES
    # With autograd on, nothing is shared: gradients reach linear_pos.
    att.projected_positions(pos_emb).sum().backward()
    assert att.linear_pos.weight.grad is not None


def test_pointwise_conv_equals_conv1d_and_keeps_its_state_dict():
    torch.manual_seed(2)
    conv = torch.nn.Conv1d(8, 12, 1)
    pw = PointwiseConv1d(8, 12, bias=True)
    assert {k: v.shape for k, v in pw.state_dict().items()} == {
        k: v.shape for k, v in conv.state_dict().items()
    }
    pw.load_state_dict(conv.state_dict())
    x = torch.randn(2, 8, 5)  # (B, C, T)
    assert torch.allclose(pw(x.transpose(1, 2)), conv(x).transpose(1, 2), atol=1e-6)


@torch.inference_mode()
def test_greedy_decoding_of_ragged_batch_equals_each_stream_alone():
    """Streams that finish early drop out of the joint; each gets what it gets alone."""
    torch.manual_seed(3)
    net = Transducer(SMALL).eval()
    with torch.no_grad():
        net.joint.joint_net[2].bias[SMALL.decoder.blank_id] -= 1.0  # emit often
    encoded = torch.randn(3, 7, 64)
    lengths = torch.tensor([7, 2, 5])
    start = stack_states([initial_decoder_state(net, 1) for _ in range(3)])
    hyps, state = greedy_decode(net, encoded, lengths, start)
    assert sum(len(h.token_ids) for h in hyps) > 5
    for b in range(3):
        one = encoded[b : b + 1, : int(lengths[b])]
        alone, alone_state = greedy_decode(
            net, one, lengths[b : b + 1], initial_decoder_state(net, 1)
        )
        assert alone[0].token_ids == hyps[b].token_ids
        assert alone[0].frames == hyps[b].frames
        mine = select_state(state, [b])
        assert torch.allclose(mine.predictor.output, alone_state.predictor.output, atol=1e-6)
        assert torch.equal(mine.frames, alone_state.frames)


@torch.inference_mode()
def test_int8_layers_approximate_their_float_layers():
    torch.manual_seed(4)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(3, 5, 64)
    q = Int8Linear.from_float(linear)
    assert q(x).shape == (3, 5, 48)
    assert float((q(x) - linear(x)).norm() / linear(x).norm()) < 0.02
    assert q.weight.dtype == torch.float32  # what callers reading `.weight.dtype` see
    assert float((q.weight - linear.weight).abs().max()) <= float(linear.weight.abs().max()) / 127
    lstm = torch.nn.LSTM(16, 16, num_layers=2, batch_first=True)
    x = torch.randn(2, 4, 16)
    state = (torch.randn(2, 2, 16) * 0.5, torch.randn(2, 2, 16) * 0.5)
    want, (h, c) = lstm(x, state)
    got, (qh, qc) = Int8LSTM(lstm)(x, state)
    assert got.shape == want.shape and qh.shape == h.shape and qc.shape == c.shape
    assert float((got - want).abs().max()) < 0.03
    assert float((qc - c).abs().max()) < 0.05


def test_quantize_transducer_copies_and_refuses_training_models():
    torch.manual_seed(5)
    net = Transducer(SMALL).eval()
    q = quantize_transducer(net)
    assert isinstance(net.encoder.layers[0].feed_forward1.linear1, torch.nn.Linear)  # untouched
    assert isinstance(q.encoder.layers[0].feed_forward1.linear1, Int8Linear)
    assert isinstance(q.encoder.layers[0].conv.pointwise_conv1, Int8Linear)
    assert isinstance(q.decoder.prediction.dec_rnn.lstm, Int8LSTM)
    assert q.encoder.layers[0].norm_out.weight is net.encoder.layers[0].norm_out.weight  # shared
    with pytest.raises(QuantizationError, match="eval"):
        quantize_transducer(net.train())


@pytest.fixture(scope="module")
def prompt_model() -> caster.Model:
    return caster.load(nemo_path(PROMPT_MODEL))


def test_quantized_fixture_model_agrees_with_float(prompt_model, oracle):
    """Int8 weights on the NeMo-built model: near float32 encoder output and tokens, and
    the language prompt projection stays float32."""
    from caster.quantize import quantize_model

    q = quantize_model(prompt_model)
    assert q.net.prompt_kernel[0].weight is prompt_model.net.prompt_kernel[0].weight
    audio = oracle["inputs/wave_a"]
    with torch.inference_mode():
        x = torch.from_numpy(audio)[None]
        mel, mel_len = prompt_model.net.preprocessor(x, torch.tensor([x.shape[1]]))
        a, _ = prompt_model.net.encoder(mel, mel_len)
        b, _ = q.net.encoder(mel, mel_len)
    assert float((b - a).norm() / a.norm()) < 0.05
    want = prompt_model.transcribe(audio, language="en-US", chunk_ms=160)
    stream = q.stream(language="en-US", chunk_ms=160)
    stream.feed(audio)
    got = stream.finish()
    same = sum(x == y for x, y in zip(want.token_ids, got.token_ids, strict=False))
    assert same >= 0.8 * len(want.token_ids)


def test_load_int8_and_cli_flag(oracle, tmp_path, capsys):
    """`caster.load(..., int8=True)` and `--int8` give the quantized network, tokens intact."""
    import soundfile

    from caster.cli import main

    path = nemo_path(PROMPT_MODEL)
    model = caster.load(path, int8=True)
    assert any(isinstance(m, Int8Linear) for m in model.net.modules())
    audio = oracle["inputs/wave_a"]
    want = caster.load(path).transcribe(audio, language="en-US")
    assert model.transcribe(audio, language="en-US").text == want.text
    wav = tmp_path / "a.wav"
    soundfile.write(wav, audio, 16000, subtype="FLOAT")
    args = ["transcribe", "--model", str(path), "--int8", "--language", "en-US", str(wav)]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == want.text
