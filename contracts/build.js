// Compile contracts/src/*.sol with the pinned solc-js into contracts/build/<Name>.json.
//
// Each artifact holds the ABI, the creation bytecode and `sources_sha256`, the SHA-256 over every source
// file (sorted relative path, NUL, content, NUL ...), so Python can tell when an artifact is stale.
// Usage: node contracts/build.js [--check]   (--check compiles in memory and exits 1 if build/ differs)
"use strict";

const crypto = require("crypto");
const fs = require("fs");
const path = require("path");
const solc = require("solc");

const SRC = path.join(__dirname, "src");
const OUT = path.join(__dirname, "build");
const CONTRACTS = ["OpenToken", "Registry", "PaymentChannels", "AttributionLedger"];

function listSources(dir, prefix = "") {
  const files = [];
  for (const entry of fs.readdirSync(dir, { withFileTypes: true }).sort((a, b) => (a.name < b.name ? -1 : 1))) {
    const rel = prefix ? `${prefix}/${entry.name}` : entry.name;
    if (entry.isDirectory()) files.push(...listSources(path.join(dir, entry.name), rel));
    else if (entry.name.endsWith(".sol")) files.push(rel);
  }
  return files.sort();
}

// Must match contracts/artifacts.py:sources_sha256.
function sourcesHash(files) {
  const hash = crypto.createHash("sha256");
  for (const rel of files) {
    hash.update(rel, "utf8");
    hash.update(Buffer.from([0]));
    hash.update(fs.readFileSync(path.join(SRC, rel)));
    hash.update(Buffer.from([0]));
  }
  return hash.digest("hex");
}

function compile() {
  const files = listSources(SRC);
  const sources = {};
  for (const rel of files) sources[rel] = { content: fs.readFileSync(path.join(SRC, rel), "utf8") };
  const input = {
    language: "Solidity",
    sources,
    settings: {
      evmVersion: "cancun",
      viaIR: false,
      optimizer: { enabled: true, runs: 1000 },
      outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
    },
  };
  const output = JSON.parse(solc.compile(JSON.stringify(input)));
  const errors = (output.errors || []).filter((e) => e.severity === "error");
  for (const e of output.errors || []) process.stderr.write(e.formattedMessage + "\n");
  if (errors.length) throw new Error(`solc reported ${errors.length} error(s)`);
  const sourcesSha256 = sourcesHash(files);
  const artifacts = {};
  for (const name of CONTRACTS) {
    const unit = output.contracts[`${name}.sol`][name];
    artifacts[name] = {
      contractName: name,
      compiler: `solc-js ${solc.version()}`,
      evmVersion: input.settings.evmVersion,
      optimizerRuns: input.settings.optimizer.runs,
      viaIR: input.settings.viaIR,
      sources_sha256: sourcesSha256,
      abi: unit.abi,
      bytecode: "0x" + unit.evm.bytecode.object,
      deployedBytecode: "0x" + unit.evm.deployedBytecode.object,
    };
  }
  return artifacts;
}

function render(artifact) {
  return JSON.stringify(artifact, null, 1) + "\n";
}

function main() {
  const check = process.argv.includes("--check");
  const artifacts = compile();
  let stale = [];
  for (const [name, artifact] of Object.entries(artifacts)) {
    const file = path.join(OUT, `${name}.json`);
    const text = render(artifact);
    if (check) {
      if (!fs.existsSync(file) || fs.readFileSync(file, "utf8") !== text) stale.push(name);
    } else {
      fs.mkdirSync(OUT, { recursive: true });
      fs.writeFileSync(file, text);
    }
  }
  if (check && stale.length) {
    process.stderr.write(`stale artifacts: ${stale.join(", ")}; run: node contracts/build.js\n`);
    process.exit(1);
  }
  if (!check) process.stdout.write(`wrote ${Object.keys(artifacts).length} artifacts to ${OUT}\n`);
}

main();
