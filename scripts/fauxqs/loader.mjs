// Node module resolve hook: answers `node:sqlite` with a stub on Node versions that do
// not have it (Node < 22.5), so fauxqs loads on this machine's Node 20. Registered by
// start.mjs with `module.register`.
import { builtinModules } from "node:module";

const hasSqlite = builtinModules.includes("sqlite");
const stub = new URL("./sqlite-stub.mjs", import.meta.url).href;

export async function resolve(specifier, context, nextResolve) {
  if (!hasSqlite && (specifier === "node:sqlite" || specifier === "sqlite")) {
    return { url: stub, format: "module", shortCircuit: true };
  }
  return nextResolve(specifier, context);
}
