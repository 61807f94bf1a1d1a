// The dashboard in a real browser (driven by .ci/browser-test, which starts the
// coordinator and the item flow): queue rows, progress and worker rows appear and
// update, schedules show their last and next runs, a dead item is requeued from the
// page, and a token-protected coordinator is usable after pasting the token. Saves a
// screenshot for the CI artifacts.
//
// Usage: node http_browser.cjs HTTP_URL TOKEN_HTTP_URL TOKEN SCREENSHOT PROFILE_DIR
"use strict";

const { chromium } = require("playwright-core");

const [url, tokenUrl, token, screenshot, profileDir] = process.argv.slice(2);
const TIMEOUT = 30000;
let passed = 0;

function ok(what) {
  passed += 1;
  console.log("ok " + passed + " - " + what);
}

function check(condition, what) {
  if (!condition) throw new Error("check failed: " + what);
}

// An item's state as the JSON API reports it, paging through the queue.
function itemState(page, queue, id) {
  return page.evaluate(
    async ([queue, id]) => {
      const headers = {};
      const saved = localStorage.getItem("workq.token");
      if (saved) headers.Authorization = "Bearer " + saved;
      let after = 0;
      for (;;) {
        const r = await fetch(`/api/v1/queues/${queue}/items?limit=1000&after=${after}`, { headers });
        const page = await r.json();
        const item = page.items.find((i) => i.id === id);
        if (item) return item.state;
        if (!page.next_after) return "missing";
        after = page.next_after;
      }
    },
    [queue, id],
  );
}

async function main() {
  const context = await chromium.launchPersistentContext(profileDir, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1400, height: 900 },
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  const problems = [];
  try {
    const page = context.pages()[0] || (await context.newPage());
    page.setDefaultTimeout(TIMEOUT);
    page.on("pageerror", (e) => problems.push("page error: " + e.message));
    page.on("console", (m) => {
      if (m.type() === "error") problems.push("console error: " + m.text());
    });

    await page.goto(url);
    check((await page.title()) === "workq", "page title");

    // Queue rows appear, with progress that moves while workers ack items.
    const batch = page.locator('#queues tr[data-queue="batch"]');
    await batch.waitFor();
    await page.locator('#queues tr[data-queue="keygen"]').waitFor();
    ok("queue rows appear");
    const done0 = Number(await batch.getAttribute("data-done"));
    await page.waitForFunction(
      (before) => {
        const row = document.querySelector('#queues tr[data-queue="batch"]');
        return row && Number(row.dataset.done) > before + 5;
      },
      done0,
      { timeout: TIMEOUT },
    );
    const label = await batch.locator(".bar-label").textContent();
    check(/^[\d,]+ \/ 303 done \([\d.]+%\)$/.test(label), "progress label: " + label);
    const width = await batch.locator(".seg-done").evaluate((e) => e.getBoundingClientRect().width);
    check(width > 0, "the done segment of the progress bar has a width");
    ok("progress updates live (" + label + ")");

    // The kuard-style queue filled and drained over memq, then sealed: complete.
    const badge = await page.locator('#queues tr[data-queue="keygen"] .badge').textContent();
    check(badge === "complete", "keygen shows complete, got " + badge);
    ok("a drained and sealed queue shows complete");

    // Worker rows appear and their counts move.
    const podA = page.locator('#workers tr[data-worker="pod-a"][data-queue="batch"]');
    await podA.waitFor();
    await page.locator('#workers tr[data-worker="pod-b"]').waitFor();
    await page.locator('#workers tr[data-worker^="memq"][data-queue="keygen"]').waitFor();
    const completed0 = Number(await podA.getAttribute("data-completed"));
    await page.waitForFunction(
      (before) => {
        const row = document.querySelector('#workers tr[data-worker="pod-a"]');
        return row && Number(row.dataset.completed) > before;
      },
      completed0,
      { timeout: TIMEOUT },
    );
    ok("worker rows appear and update (pod-a, pod-b, the memq client)");

    // Schedules: the ticking one shows its last run (enqueued, then skipped under
    // Forbid) and its next; the suspended one shows no next run.
    const ticker = page.locator('#schedules tr[data-schedule="ticker"][data-outcome="skipped"]');
    await ticker.waitFor();
    const tickerCells = await ticker.locator("td").allTextContents();
    check(tickerCells[1] === "ticks" && tickerCells[2] === "* * * * * *", "ticker row: " + tickerCells);
    check(tickerCells[3] === "Forbid", "ticker policy: " + tickerCells[3]);
    check(tickerCells[5] === "skipped: previous run unfinished", "ticker result: " + tickerCells[5]);
    check(/^in \d+s$/.test(tickerCells[6]), "ticker next run: " + tickerCells[6]);
    const nightly = await page.locator('#schedules tr[data-schedule="nightly"] td').allTextContents();
    check(nightly[0] === "nightly (suspended)", "nightly name: " + nightly[0]);
    check(nightly[2] === "0 2 * * * Europe/Stockholm", "nightly cron: " + nightly[2]);
    check(nightly[4] === "–" && nightly[6] === "–", "nightly has no runs: " + nightly);
    check((await page.locator("#schedule-count").textContent()) === "(2)", "two schedules counted");
    ok("schedules show their last run, its result and the next one");

    // Dead items with their last error; requeue one from the page.
    await page.waitForFunction(() => document.querySelectorAll("#dead tbody tr").length === 3, null, {
      timeout: TIMEOUT,
    });
    const firstDead = page.locator("#dead tbody tr").first();
    const error = await firstDead.locator("td.error-text").textContent();
    check(error.includes("poisoned input"), "dead item shows its last error: " + error);
    const id = Number(await firstDead.getAttribute("data-item"));
    ok("dead items are listed with their last error");

    await firstDead.locator("button.requeue").click();
    await page.locator(`#dead tr[data-item="${id}"]`).waitFor({ state: "detached" });
    check((await page.locator("#dead tbody tr").count()) === 2, "two dead items left");
    // The item is back in the queue: workers pick it up again and complete it.
    const deadline = Date.now() + TIMEOUT;
    let state;
    while ((state = await itemState(page, "batch", id)) !== "done") {
      check(Date.now() < deadline, `requeued item #${id} completes (state: ${state})`);
      await page.waitForTimeout(200);
    }
    ok(`requeue from the page moved item #${id} back, and a worker completed it`);

    await page.screenshot({ path: screenshot, fullPage: true });
    ok("screenshot saved to " + screenshot);

    check(problems.length === 0, "no page or console errors:\n" + problems.join("\n"));
    ok("no page or console errors while items flowed");

    // A coordinator with --token-file: the page asks for the token, then works.
    await page.goto(tokenUrl);
    await page.locator("#token-panel").waitFor({ state: "visible" });
    check((await page.locator("#conn").textContent()) === "token needed", "asks for a token");
    await page.fill("#token-input", token);
    await page.click('#token-form button[type="submit"]');
    await page.locator('#queues tr[data-queue="secured"]').waitFor();
    await page.locator("#token-panel").waitFor({ state: "hidden" });
    check(
      (await page.evaluate(() => localStorage.getItem("workq.token"))) === token,
      "token kept in localStorage",
    );
    await page.reload();
    await page.locator('#queues tr[data-queue="secured"]').waitFor();
    ok("with a token set, the pasted token is kept and sent as a Bearer header");

    // Chromium logs the expected 401s of the token phase as resource errors.
    const unexpected = problems.filter((p) => !p.includes("status of 401"));
    check(unexpected.length === 0, "no page or console errors:\n" + unexpected.join("\n"));
    ok("no page errors in the token flow");
  } finally {
    await context.close();
  }
  console.log(passed + " passed, 0 failed");
}

main().catch((e) => {
  console.error("browser test failed: " + (e.stack || e));
  console.log(passed + " passed, 1 failed");
  process.exit(1);
});
