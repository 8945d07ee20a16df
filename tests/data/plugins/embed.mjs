// wasm-tools (jco's npm build) as a library: WAT -> core module -> embed a world -> component.
import { componentEmbed, componentNew, parse } from "@bytecodealliance/jco-transpile/wasm-tools";
import { readFile, writeFile } from "node:fs/promises";
const [wat, wit, world, out] = process.argv.slice(2);
const core = await parse(await readFile(wat, "utf8"));
const embedded = await componentEmbed({ binary: core, witSource: await readFile(wit, "utf8"), world });
await writeFile(out, await componentNew(embedded));
