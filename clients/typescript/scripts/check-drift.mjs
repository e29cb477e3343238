// Fails when src/schema.d.ts is not what openapi-typescript generates from
// ../../openapi.yaml today: regenerate with `npm run generate` and commit.
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const dir = mkdtempSync(join(tmpdir(), "finetuned-schema-"));
try {
  const fresh = join(dir, "schema.d.ts");
  const cli = join(root, "node_modules", "openapi-typescript", "bin", "cli.js");
  execFileSync(process.execPath, [cli, join(root, "..", "..", "openapi.yaml"),
    "--default-non-nullable", "false", "--output", fresh], { cwd: root, stdio: ["ignore", "ignore", "inherit"] });
  const committed = join(root, "src", "schema.d.ts");
  if (readFileSync(fresh, "utf8") !== readFileSync(committed, "utf8")) {
    try {
      execFileSync("diff", ["-u", committed, fresh], { stdio: "inherit" });
    } catch {}
    console.error("src/schema.d.ts is out of date with openapi.yaml: run `npm run generate` in clients/typescript");
    process.exit(1);
  }
  console.log("src/schema.d.ts matches openapi.yaml");
} finally {
  rmSync(dir, { recursive: true, force: true });
}
