// A round-robin TCP proxy in front of the gateway replicas, like a load balancer without sticky
// sessions: each new connection goes to the next replica that accepts it. It remembers which
// replica serves each WebSocket, so a test can kill that one.
import { connect, createServer } from "node:net";

export async function startProxy(backends) {
  let next = 0;
  const sockets = new Set();
  /** Open WebSocket connections: { backend, path }. */
  const websockets = new Set();
  const server = createServer((client) => {
    sockets.add(client);
    client.on("close", () => sockets.delete(client));
    client.on("error", () => {});
    client.pause();
    let tries = 0;
    const attempt = () => {
      const i = next++ % backends.length;
      const b = backends[i];
      const upstream = connect(b.port, "127.0.0.1");
      let connected = false;
      upstream.on("connect", () => {
        connected = true;
        sockets.add(upstream);
        let first = true;
        const entry = { backend: i };
        client.on("data", (d) => {
          if (first) {
            first = false;
            const line = d.subarray(0, 200).toString("latin1").split("\r\n")[0] ?? "";
            if (/^GET \/ws\//.test(line) && /upgrade: websocket/i.test(d.toString("latin1"))) {
              entry.path = line.split(" ")[1];
              websockets.add(entry);
            }
          }
          if (!upstream.write(d)) client.pause();
        });
        upstream.on("drain", () => client.resume());
        upstream.on("data", (d) => {
          if (!client.write(d)) upstream.pause();
        });
        client.on("drain", () => upstream.resume());
        const end = () => {
          websockets.delete(entry);
          client.destroy();
          upstream.destroy();
        };
        upstream.on("close", end);
        client.on("close", end);
        client.resume();
      });
      upstream.on("error", () => {
        sockets.delete(upstream);
        if (!connected) {
          // Refused (the replica is down): the next one.
          if (++tries < backends.length * 2) attempt();
          else client.destroy();
        }
      });
    };
    attempt();
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const { port } = server.address();
  return {
    url: `http://127.0.0.1:${port}`,
    /** The replicas (indexes into `backends`) serving the open WebSockets. */
    websocketBackends: () => [...websockets].map((w) => w.backend),
    close: () => {
      server.close();
      for (const s of sockets) s.destroy();
    },
  };
}
