/** Reconnect delays: exponential, capped, with jitter so a fleet's clients do not return at once. */
export interface BackoffOptions {
  /** First delay, ms (default 250). */
  initialMs?: number;
  /** Largest delay, ms (default 10 000). */
  maxMs?: number;
  /** Growth per attempt (default 2). */
  factor?: number;
  /** Share of the delay that is random, 0..1 (default 0.5: between half and the whole delay). */
  jitter?: number;
}

/** The delay before reconnect attempt `attempt` (1 = first retry). `random` returns [0, 1). */
export function backoffDelay(attempt: number, opts: BackoffOptions = {}, random = Math.random): number {
  const initial = opts.initialMs ?? 250;
  const max = opts.maxMs ?? 10_000;
  const factor = opts.factor ?? 2;
  const jitter = Math.min(1, Math.max(0, opts.jitter ?? 0.5));
  const base = Math.min(max, initial * factor ** Math.max(0, attempt - 1));
  return Math.round(base * (1 - jitter) + base * jitter * random());
}
