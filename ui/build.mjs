// Copies the dashboard's front-end libraries from node_modules (filled by `npm ci`) into the
// Python package's git-ignored vendor folder, where the server serves them under /ui/static/.
// Run by scripts/setup.sh; by hand: (cd ui && npm ci && npm run build).
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const target = join(here, "..", "src", "nox_api", "ui", "static", "vendor");
const files = [
  // [from node_modules, to the vendor folder]
  ["htmx.org/dist/htmx.min.js", "htmx.min.js"],
  ["htmx.org/LICENSE", "htmx.LICENSE.txt"],
];

mkdirSync(target, { recursive: true });
for (const [from, to] of files) {
  copyFileSync(join(here, "node_modules", from), join(target, to));
}
const version = JSON.parse(
  readFileSync(join(here, "node_modules", "htmx.org", "package.json"), "utf8"),
).version;
// Written last: its presence says the copy above finished.
writeFileSync(join(target, "VERSIONS.txt"), `htmx.org ${version}\n`);
console.log(`dashboard assets: htmx.org ${version} -> ${target}`);
