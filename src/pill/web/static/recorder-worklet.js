// The page's microphone recorder (app.js, "Record"): passes each block of the first input
// channel to the page, which keeps the samples and writes the WAV file.
class PillRecorder extends AudioWorkletProcessor {
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) this.port.postMessage(channel.slice(0));
    return true;
  }
}
registerProcessor("pill-recorder", PillRecorder);
