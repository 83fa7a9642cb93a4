// The SDK's minifier, run by scripts/build-sdk (through server/sdk_build.py): terser, pinned in
// package-lock.json. Reads {"name": "source", ...} as JSON on stdin, writes {"name": "minified", ...}.
// One process for every variant: Node starts once, not once per feature combination.
import { minify } from "terser";

const OPTIONS = {
  ecma: 2020, // what the template may use: arrows, spread, async, optional chaining, ??
  compress: { passes: 2 }, // a second pass finds a few more bytes; further passes find none
  mangle: true, // every name is local to the SDK's closure; only the config placeholder is global
  format: { comments: false },
};

let input = "";
for await (const chunk of process.stdin) input += chunk;
const sources = JSON.parse(input);
const out = {};
for (const [name, source] of Object.entries(sources)) {
  out[name] = (await minify({ [name]: source }, OPTIONS)).code;
}
process.stdout.write(JSON.stringify(out));
