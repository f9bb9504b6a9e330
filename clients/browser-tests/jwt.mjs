// HS256 tokens signed with the fleet's secret, as `mozaiks token` and the broker sign them.
import { createHmac, randomUUID } from "node:crypto";

const b64 = (v) => Buffer.from(typeof v === "string" ? v : JSON.stringify(v)).toString("base64url");

export function sign(claims, secret) {
  const head = b64({ alg: "HS256", typ: "JWT" });
  const body = b64(claims);
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

export function decode(token) {
  return JSON.parse(Buffer.from(token.split(".")[1], "base64url").toString());
}

/** A user token (`aud=mozaiks`). */
export function userToken(secret, sub, appId = "default", roles = ["user"], ttlSecs = 3600) {
  const now = Math.floor(Date.now() / 1000);
  return sign({ sub, app_id: appId, roles, iat: now, exp: now + ttlSecs, iss: "mozaiks", aud: "mozaiks" }, secret);
}

/** The same runtime token with another expiry (`aud=mozaiks-runtime`). */
export function withExpiry(runtimeToken, secret, expiresInSecs) {
  const c = decode(runtimeToken);
  const now = Math.floor(Date.now() / 1000);
  return sign({ ...c, iat: now, exp: now + expiresInSecs, jti: randomUUID() }, secret);
}
