/**
 * Streamed text of one message, assembled from `agent.delta` frames by `offset`: the text is its
 * first `offset` UTF-8 bytes followed by the delta's `text` (a model call retried from the start
 * restarts at 0 and replaces what was shown). A client that joined mid-message knows the text
 * only from the first offset it saw: `partial` says so.
 */
export class DeltaText {
  private bytes = new Uint8Array(0);
  /** The offset (in the message) where `bytes` starts. */
  private start = 0;
  private static readonly enc = new TextEncoder();
  private static readonly dec = new TextDecoder();

  /** Applies one delta. */
  apply(offset: number, text: string): void {
    const add = DeltaText.enc.encode(text);
    const end = this.start + this.bytes.length;
    if (offset < this.start || (this.bytes.length === 0 && offset !== this.start) || offset > end) {
      // Before what we hold (a restart), or after a hole (we joined late or missed deltas).
      this.start = offset;
      this.bytes = add;
      return;
    }
    const keep = offset - this.start;
    const next = new Uint8Array(keep + add.length);
    next.set(this.bytes.subarray(0, keep));
    next.set(add, keep);
    this.bytes = next;
  }

  /** Whether the beginning of the message is unknown. */
  get partial(): boolean {
    return this.start > 0;
  }

  /** Bytes known, from `start`. */
  get length(): number {
    return this.start + this.bytes.length;
  }

  /** The text known so far (a cut multi-byte character at the end is left out). */
  get text(): string {
    let end = this.bytes.length;
    // Do not show half a character: back off over an incomplete trailing UTF-8 sequence.
    let i = end - 1;
    let cont = 0;
    while (i >= 0 && ((this.bytes[i] ?? 0) & 0xc0) === 0x80 && cont < 3) {
      i--;
      cont++;
    }
    if (i >= 0) {
      const lead = this.bytes[i] ?? 0;
      const need = lead >= 0xf0 ? 3 : lead >= 0xe0 ? 2 : lead >= 0xc0 ? 1 : 0;
      if (need > cont) end = i;
    }
    return DeltaText.dec.decode(this.bytes.subarray(0, end));
  }
}
