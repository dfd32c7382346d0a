"""caster: cache-aware streaming speech recognition without NeMo.

import caster
model = caster.load("nemotron-3.5-asr-streaming-0.6b.nemo")
print(model.transcribe("audio.wav", language="en-US").text)
"""

from caster.endpoint import EndpointConfig
from caster.engine import Engine, StreamHandle
from caster.model import Model, Transcript, load
from caster.results import Segment, StreamResult, Word
from caster.streaming import Stream, StreamEvent

__all__ = [
    "EndpointConfig",
    "Engine",
    "Model",
    "Segment",
    "Stream",
    "StreamEvent",
    "StreamHandle",
    "StreamResult",
    "Transcript",
    "Word",
    "load",
]
