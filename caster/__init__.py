"""caster: cache-aware streaming speech recognition without NeMo.

import caster
model = caster.load("nemotron-3.5-asr-streaming-0.6b.nemo")
print(model.transcribe("audio.wav", language="en-US").text)
"""

from caster.model import Model, Transcript, load
from caster.streaming import Stream, StreamEvent

__all__ = ["Model", "Stream", "StreamEvent", "Transcript", "load"]
