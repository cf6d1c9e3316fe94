// Drives sluiced's RESP port with the npm `redis` client (Debian node-redis); prints JSON.
// usage: node node_client.js PORT
const { createClient } = require('redis');

async function main() {
  const client = createClient({ socket: { host: '127.0.0.1', port: Number(process.argv[2]) } });
  client.on('error', (e) => { console.error(e); process.exit(1); });
  await client.connect();
  const out = {};
  out.ping = await client.ping();
  out.rule = await client.sendCommand(['SL.RULE', 'SET', 'ACTION', 'node', 'api',
                                       'fixed_window', 'LIMIT', '3', 'WINDOW', '3600']);
  // Commands issued together are pipelined on the one connection.
  out.takes = await Promise.all([1, 2, 3, 4].map(() =>
    client.sendCommand(['SL.TAKE', 'node', 'api', 'client-1'])));
  out.throttle = await client.sendCommand(['CL.THROTTLE', 'node-key', '15', '30', '60', '1']);
  try {
    await client.sendCommand(['SL.TAKE', 'node', 'api', '']);
    out.error = null;
  } catch (e) {
    out.error = e.message;
  }
  await client.quit();
  console.log(JSON.stringify(out));
}
main().catch((e) => { console.error(e); process.exit(1); });
