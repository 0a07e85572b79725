// Visits pages of Lumen's dashboard in headless Chromium (playwright-core) and reports, as
// one JSON object on stdout, what a browser test asserts on: for each page its HTTP status,
// title, the elements a CSS selector matched (their data-* attributes), console errors and
// page errors, and every request to an origin other than the dashboard's own.
//
// usage: node visit.cjs <plan.json>
//   plan: {"base": "http://127.0.0.1:PORT", "screenshots": "/dir",
//          "pages": [{"name": "graph", "path": "/", "select": "svg .node",
//                     "click": "svg .node", "read": "#detail"}]}
//   click: the first element matching it is clicked (after the load); read: the text of the
//   element matching it, afterwards; follow: links then clicked in turn, each page reported
//   in `arrived` (URL, status, title, the data-* of what its `select` matches); back: pages
//   to go back afterwards (the URL reached is `back`). keyboard: {"tab_to": sel, "press": key,
//   "read": sel, "then": key}: Tab (at most 80 times) until the focused element matches
//   `tab_to`, press `press`, read `read`, press `then`; reported in `keyboard` (tabs taken,
//   the focused element's data-*, the text read, and afterwards whether `read` is hidden and
//   what has focus).
// Playwright comes from $LUMEN_NODE_MODULES (default /var/tmp/lumen-peers/node/node_modules);
// Chromium from $LUMEN_CHROMIUM (default /usr/bin/chromium).
'use strict';
const fs = require('fs');
const path = require('path');

const modules = process.env.LUMEN_NODE_MODULES || '/var/tmp/lumen-peers/node/node_modules';
const { chromium } = require(path.join(modules, 'playwright-core'));

async function main() {
  const plan = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const base = new URL(plan.base);
  const browser = await chromium.launch({
    executablePath: process.env.LUMEN_CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const report = { pages: [] };
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    for (const p of plan.pages) {
      const page = await context.newPage();
      const seen = { console_errors: [], page_errors: [], foreign_requests: [] };
      page.on('console', (m) => { if (m.type() === 'error') seen.console_errors.push(m.text()); });
      page.on('pageerror', (e) => seen.page_errors.push(String(e)));
      page.on('request', (r) => {
        const u = new URL(r.url());
        if (u.protocol === 'data:' || u.protocol === 'about:') return;
        if (u.origin !== base.origin) seen.foreign_requests.push(r.url());
      });
      const response = await page.goto(new URL(p.path, base).toString(), { waitUntil: 'load' });
      const matched = p.select
        ? await page.$$eval(p.select, (els) => els.map((e) => Object.assign({}, e.dataset)))
        : [];
      let keyboard = null;
      if (p.keyboard) {
        const k = p.keyboard;
        const focusedData = () => page.evaluate(() => Object.assign({}, document.activeElement && document.activeElement.dataset));
        let tabs = 0;
        let reached = false;
        while (tabs < 80 && !reached) {
          await page.keyboard.press('Tab');
          tabs += 1;
          reached = await page.evaluate((sel) => !!document.activeElement && document.activeElement.matches(sel), k.tab_to);
        }
        keyboard = { tabs, reached, focused: await focusedData() };
        if (reached && k.press) {
          await page.keyboard.press(k.press);
          keyboard.read = k.read ? await page.$eval(k.read, (el) => (el.hidden ? '' : el.textContent)) : null;
          if (k.then) {
            await page.keyboard.press(k.then);
            keyboard.hidden_after = k.read ? await page.$eval(k.read, (el) => el.hidden) : null;
            keyboard.focused_after = await focusedData();
          }
        }
      }
      let read = null;
      if (p.click) {
        await page.click(p.click);
      }
      if (p.read) {
        read = await page.$eval(p.read, (el) => (el.hidden ? '' : el.textContent));
      }
      // follow: links to click one after the other ([{"click": sel, "select": sel}]); each
      // page they lead to is reported in `arrived`; then `back` goes back that many pages.
      const arrived = [];
      for (const [k, step] of (p.follow || []).entries()) {
        const status = await Promise.all([
          page.waitForNavigation({ waitUntil: 'load' }),
          page.click(step.click),
        ]).then(([r]) => (r ? r.status() : 0));
        if (plan.screenshots) {
          await page.screenshot({ path: path.join(plan.screenshots, `${p.name}-${k + 1}.png`), fullPage: true });
        }
        arrived.push({
          url: page.url(),
          status,
          title: await page.title(),
          matched: step.select
            ? await page.$$eval(step.select, (els) => els.map((e) => Object.assign({}, e.dataset)))
            : [],
        });
      }
      let back = null;
      for (let k = 0; k < (p.back || 0); k += 1) {
        await page.goBack({ waitUntil: 'load' });
        back = page.url();
      }
      if (plan.screenshots) {
        fs.mkdirSync(plan.screenshots, { recursive: true });
        await page.screenshot({ path: path.join(plan.screenshots, `${p.name}.png`), fullPage: true });
      }
      report.pages.push({
        name: p.name,
        status: response ? response.status() : 0,
        title: await page.title(),
        matched,
        read,
        keyboard,
        arrived,
        back,
        ...seen,
      });
      await page.close();
    }
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(report) + '\n');
}

main().catch((e) => { process.stderr.write(String(e && e.stack || e) + '\n'); process.exit(1); });
