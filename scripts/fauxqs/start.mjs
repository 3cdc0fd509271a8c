// Starts the fauxqs SQS emulator on 127.0.0.1 only (its own CLI listens on 0.0.0.0).
//
//   node scripts/fauxqs/start.mjs
//
// Environment: FAUXQS_PREFIX (the npm prefix fauxqs is installed in; default
// .build/fauxqs), SQS_PORT (default 9324), FAUXQS_LOGGER=true to log every request.
import { register } from "node:module";
import { readFile } from "node:fs/promises";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";

register("./loader.mjs", import.meta.url);

const prefix = resolve(process.env.FAUXQS_PREFIX ?? ".build/fauxqs");
const port = Number.parseInt(process.env.SQS_PORT ?? "9324", 10);
const host = "127.0.0.1";

const pkgDir = join(prefix, "node_modules", "fauxqs");
const pkg = JSON.parse(await readFile(join(pkgDir, "package.json"), "utf8"));
// Imported after the hook is registered, so its `node:sqlite` import finds the stub.
const { buildApp } = await import(pathToFileURL(join(pkgDir, pkg.main)).href);

const app = buildApp({ logger: process.env.FAUXQS_LOGGER === "true" });
const address = await app.listen({ port, host });
console.log(`fauxqs ${pkg.version} listening on ${address} (pid ${process.pid})`);

for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => {
    app.close().finally(() => process.exit(0));
  });
}
