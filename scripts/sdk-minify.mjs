// The SDK's minifier, run by scripts/build-sdk (through server/sdk_build.py): terser, pinned in
// package-lock.json. Reads {"name": {"code": "source", "pure_funcs": ["log"]}, ...} as JSON on stdin
// (pure_funcs: the functions whose calls may be dropped, no-ops in that variant), writes
// {"name": "minified", ...}.
// One process for every variant: Node starts once, not once per feature combination.
import { minify } from "terser";

const OPTIONS = {
  ecma: 2020, // what the template may use: arrows, spread, async, optional chaining, ??
  // A second pass finds a few more bytes; further passes find none. inline: 1 (terser's "simple
  // functions" only, not those with arguments): a function called once with an argument is not
  // unrolled into a `var` and assignments at its call (its arrow gzips smaller: measured).
  compress: { passes: 2, inline: 1 },
  mangle: true, // every name is local to the SDK's closure; only the config placeholder is global
  format: { comments: false },
};

let input = "";
for await (const chunk of process.stdin) input += chunk;
const sources = JSON.parse(input);
const out = {};
for (const [name, { code, pure_funcs }] of Object.entries(sources)) {
  const options = { ...OPTIONS, compress: { ...OPTIONS.compress, pure_funcs } };
  out[name] = (await minify({ [name]: code }, options)).code;
}
process.stdout.write(JSON.stringify(out));
