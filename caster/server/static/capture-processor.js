// AudioWorklet processor: the microphone's samples, unaltered, in batches for the WebSocket.
//
// Runs on the audio rendering thread. Each 128-frame render block is mixed down
// to mono (the mean of the channels: exact when they are equal copies of a mono
// source) and collected into batches of `batchSamples`, which are posted to the
// page as transferable Float32Arrays. Nothing is resampled or filtered here:
// the page runs the AudioContext at the microphone's own rate and the server
// resamples, so a recording reaches the model exactly as `caster transcribe`
// would read it from a file.
//
// processorOptions:
//   batchSamples  samples per posted batch (the page picks about 20 ms)
//   maxSamples    stop after this many samples (0: never); then {type: "end"}
//   skipSilence   drop the exact zeros a capture device delivers before its
//                 first real sample (a device that has not started yet, or a
//                 muted input): real audio is never exactly 0.0 for long

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    this.batch = new Float32Array(Math.max(1, opts.batchSamples | 0));
    this.filled = 0;
    this.maxSamples = opts.maxSamples > 0 ? Math.floor(opts.maxSamples) : Infinity;
    this.sent = 0;
    this.waiting = Boolean(opts.skipSilence);
    this.ended = false;
    this.port.onmessage = (event) => {
      if (event.data && event.data.type === "stop") this.finish();
    };
  }

  process(inputs) {
    if (this.ended) return false;
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true; // no input connected yet
    const frames = channels[0].length;
    for (let i = 0; i < frames; i++) {
      let sum = 0;
      for (let c = 0; c < channels.length; c++) sum += channels[c][i];
      const sample = sum / channels.length;
      if (this.waiting) {
        if (sample === 0) continue;
        this.waiting = false;
      }
      this.batch[this.filled++] = sample;
      this.sent++;
      if (this.filled === this.batch.length) this.flush();
      if (this.sent >= this.maxSamples) {
        this.finish();
        return false;
      }
    }
    return true;
  }

  flush() {
    if (this.filled === 0) return;
    const out = this.batch.slice(0, this.filled);
    this.port.postMessage({ type: "audio", samples: out }, [out.buffer]);
    this.filled = 0;
  }

  finish() {
    if (this.ended) return;
    this.flush();
    this.ended = true;
    this.port.postMessage({ type: "end", samples: this.sent });
  }
}

registerProcessor("caster-capture", CaptureProcessor);
