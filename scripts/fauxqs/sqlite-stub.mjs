// A stand-in for `node:sqlite`, which Node 20 lacks. fauxqs imports it at load time
// for its optional persistence (`dataDir`), which the tests never turn on; any use
// fails loudly instead of silently losing state.
export class DatabaseSync {
  constructor() {
    throw new Error("node:sqlite is not available on this Node version; fauxqs persistence (dataDir) is disabled");
  }
}
export class StatementSync {}
export default { DatabaseSync, StatementSync };
