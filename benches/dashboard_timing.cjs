// The dashboard's pages timed in headless Chromium (playwright-core): each page loaded
// `runs` times, its Navigation Timing entry read (responseEnd - requestStart: the server's
// render and the transfer; encodedBodySize: the transferred weight), beside the same data
// fetched straight from the query API from the same page (fetch timed with
// performance.now()). Prints one JSON object.
//
// usage: node dashboard_timing.cjs <plan.json>
//   plan: {"base": "...", "runs": 30, "pages": [{"name": "...", "path": "...", "api": "..."}]}
'use strict';
const fs = require('fs');
const path = require('path');

const modules = process.env.LUMEN_NODE_MODULES || '/var/tmp/lumen-peers/node/node_modules';
const { chromium } = require(path.join(modules, 'playwright-core'));

function p95(xs) {
  const s = xs.slice().sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.round((s.length - 1) * 0.95))];
}

async function main() {
  const plan = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const browser = await chromium.launch({
    executablePath: process.env.LUMEN_CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const out = [];
  try {
    const page = await browser.newPage();
    for (const p of plan.pages) {
      const server = [];
      let weight = 0;
      const api = [];
      for (let i = 0; i < plan.runs; i += 1) {
        await page.goto(new URL(p.path, plan.base).toString(), { waitUntil: 'load' });
        const nav = await page.evaluate(() => {
          const e = performance.getEntriesByType('navigation')[0];
          return { ms: e.responseEnd - e.requestStart, bytes: e.encodedBodySize };
        });
        server.push(nav.ms);
        weight = Math.max(weight, nav.bytes);
        if (p.api) {
          api.push(await page.evaluate(async (url) => {
            const t = performance.now();
            const r = await fetch(url, { cache: 'no-store' });
            await r.arrayBuffer();
            return performance.now() - t;
          }, p.api));
        }
      }
      out.push({ name: p.name, p95_ms: p95(server), api_p95_ms: api.length ? p95(api) : null, bytes: weight });
    }
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify({ pages: out }) + '\n');
}

main().catch((e) => { process.stderr.write(String(e && e.stack || e) + '\n'); process.exit(1); });
